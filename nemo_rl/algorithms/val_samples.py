"""`logger.num_val_samples_to_print`: the first N validation samples, each with its prompt, its
target and the model's greedy continuation, printed at every validation.

The prompt is the conversation up to its last assistant turn, rendered with the chat template
and the generation prompt (`encode_generation_prompt`); the target is that assistant turn's
text. The policy continues every prompt greedily for at most the longest target's token
count plus `MARGIN_TOKENS`, and never more than `policy.max_total_sequence_length` tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nemo_rl.algorithms.eval_metrics import gold_answers_of
from nemo_rl.data.processors import SFTDataset, encode_generation_prompt

MARGIN_TOKENS = 16  # room past the target's length, to see where the model would stop


@dataclass
class ValSample:
    prompt_ids: list[int]
    target: str  # the last assistant turn's text
    target_num_tokens: int
    # what scoring accepts: the row's `gold_answers` (squad keeps them all), else the target
    gold_answers: list[str] = field(default_factory=list)


def first_val_samples(
    dataset: SFTDataset,
    tokenizer,
    num_samples: int,
) -> list[ValSample]:
    """The first `num_samples` samples of `dataset` (all of them if it has fewer) that have an
    assistant turn, split into prompt and target."""
    samples = []
    for index in range(len(dataset)):
        if len(samples) == num_samples:
            break
        messages, tools = dataset.conversation(index)
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is None:
            continue
        prompt_ids = encode_generation_prompt(messages[:last_assistant], tokenizer, dataset.options, tools=tools)
        target = message_text(messages[last_assistant])
        target_num_tokens = len(tokenizer(target, add_special_tokens=False)["input_ids"])
        gold_answers = gold_answers_of(dataset.source_row(index), target)
        samples.append(ValSample(prompt_ids, target, target_num_tokens, gold_answers=gold_answers))
    return samples


def max_new_tokens_for(samples: list[ValSample], max_total_sequence_length: int) -> int:
    """The longest target's token count plus `MARGIN_TOKENS`, at most `max_total_sequence_length`."""
    longest = max(sample.target_num_tokens for sample in samples)
    return max(1, min(longest + MARGIN_TOKENS, max_total_sequence_length))


def print_val_samples(
    policy,
    samples: list[ValSample],
    tokenizer,
    *,
    step: int,
    max_total_sequence_length: int,
    print_fn: Callable[[str], None],
) -> None:
    """Generates greedily for `samples` on `policy` (a `Policy`) and prints each through `print_fn`."""
    if not samples:
        return
    max_new_tokens = max_new_tokens_for(samples, max_total_sequence_length)
    continuations = policy.generate_greedy([s.prompt_ids for s in samples], max_new_tokens=max_new_tokens)
    for number, (sample, continuation_ids) in enumerate(zip(samples, continuations, strict=True), 1):
        print_fn(
            format_val_sample(
                number,
                len(samples),
                step=step,
                prompt=tokenizer.decode(sample.prompt_ids, skip_special_tokens=False),
                target=sample.target,
                continuation=tokenizer.decode(continuation_ids, skip_special_tokens=True),
                num_new_tokens=len(continuation_ids),
            )
        )


def score_val_generations(
    policy,
    samples: list[ValSample],
    tokenizer,
    *,
    metric: str,
    max_total_sequence_length: int,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """`sft.val_generation`: greedy answers to `samples` on `policy`, scored against their
    targets: {"gen_exact_match", "gen_f1"} (squad) or {"gen_accuracy"} (math), means in [0, 1]."""
    from nemo_rl.algorithms.eval_metrics import math_equal, squad_scores

    if not samples:
        return {}
    budget = max_new_tokens or max_new_tokens_for(samples, max_total_sequence_length)
    continuations = policy.generate_greedy([s.prompt_ids for s in samples], max_new_tokens=budget)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in continuations]
    if metric == "math":
        return {"gen_accuracy": sum(math_equal(t, s.target) for t, s in zip(texts, samples, strict=True)) / len(samples)}
    scores = [squad_scores(t, s.gold_answers or [s.target]) for t, s in zip(texts, samples, strict=True)]
    return {f"gen_{name}": sum(score[name] for score in scores) / len(scores) for name in ("exact_match", "f1")}


def format_val_sample(
    number: int, total: int, *, step: int, prompt: str, target: str, continuation: str, num_new_tokens: int
) -> str:
    """The prompt with its special tokens; the continuation without them (its token count says
    how long it ran: an end-of-sequence token or whitespace alone print as nothing)."""
    return "\n".join(
        [
            f"validation sample {number}/{total} at step {step}",
            "[prompt]",
            prompt,
            "[target]",
            target,
            f"[model, greedy: {num_new_tokens} tokens]",
            continuation,
        ]
    )


def message_text(message: dict[str, Any]) -> str:
    """A message's text: its content (the text parts of a list), or its tool calls as JSON."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if content:
        return content
    return json.dumps(message["tool_calls"]) if message.get("tool_calls") else ""
