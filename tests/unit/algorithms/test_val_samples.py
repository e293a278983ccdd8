"""logger.num_val_samples_to_print: prompt, target and greedy continuation of the first N
validation samples, printed through the progress reporter; N = 0 does nothing at all."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests.unit.data.data_test_utils import tokenization

from nemo_rl.algorithms import sft
from nemo_rl.algorithms.val_samples import (
    MARGIN_TOKENS,
    first_val_samples,
    format_val_sample,
    message_text,
    print_val_samples,
)
from nemo_rl.config.schema import TokenizerConfig, ValGenerationConfig
from nemo_rl.data.interfaces import TaskDataSpec
from nemo_rl.data.processors import SFTDataset
from nemo_rl.data.tokenizer import get_tokenizer
from nemo_rl.utils.progress import ProgressReporter

TINY_LLAMA = Path(__file__).resolve().parents[3] / "assets" / "tiny-llama"

ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Name a whale."},
            {"role": "assistant", "content": "The blue whale."},
            {"role": "user", "content": "How long is it?"},
            {"role": "assistant", "content": "Up to thirty metres long."},
        ]
    },
    {"messages": [{"role": "user", "content": "Third?"}, {"role": "assistant", "content": "Never printed."}]},
]
CONTINUATIONS = ["Paris, of course", "About 30 m"]


class FakePolicy:
    """Answers generate_greedy with fixed texts (then EOS) and records the calls."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = []

    def generate_greedy(self, prompts, *, max_new_tokens):
        self.calls.append((prompts, max_new_tokens))
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        return [encode(text) + [self.tokenizer.eos_token_id] for text in CONTINUATIONS[: len(prompts)]]


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(TokenizerConfig(name=str(TINY_LLAMA)))


@pytest.fixture
def dataset(tokenizer, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Q: {}")  # the task's prompt format applies to the printed prompt too
    task_spec = TaskDataSpec("test", prompt_file=str(prompt_file))
    return SFTDataset(ROWS, tokenizer, task_spec, tokenization(max_seq_length=256), source="validation")


def _expected_prompt(tokenizer, row: dict) -> str:
    """The conversation before its last assistant turn with the prompt format applied, rendered
    with the generation prompt (the template renders BOS itself)."""
    before_last = [
        {**m, "content": f"Q: {m['content']}"} if m["role"] == "user" else m for m in row["messages"][:-1]
    ]
    return tokenizer.apply_chat_template(before_last, add_generation_prompt=True, tokenize=False)


def test_prints_prompt_target_and_continuation_of_the_first_n(tokenizer, dataset):
    policy = FakePolicy(tokenizer)
    printed: list[str] = []
    samples = first_val_samples(dataset, tokenizer, 2)
    print_val_samples(policy, samples, tokenizer, step=7, max_total_sequence_length=256, print_fn=printed.append)

    prompts = [_expected_prompt(tokenizer, row) for row in ROWS[:2]]
    assert prompts[1].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "The blue whale." in prompts[1] and "Q: How long is it?" in prompts[1]
    continuation_tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in CONTINUATIONS]  # + EOS
    assert printed == [
        f"validation sample 1/2 at step 7\n[prompt]\n{prompts[0]}\n[target]\nParis\n"
        f"[model, greedy: {continuation_tokens[0]} tokens]\nParis, of course",
        f"validation sample 2/2 at step 7\n[prompt]\n{prompts[1]}\n[target]\nUp to thirty metres long.\n"
        f"[model, greedy: {continuation_tokens[1]} tokens]\nAbout 30 m",
    ]

    # one call with both prompts, as token ids of the rendered text (BOS once); the longest
    # target's tokens plus the margin
    (sent, max_new_tokens), = policy.calls
    assert sent == [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert sent[0][0] == tokenizer.bos_token_id and sent[0][1] != tokenizer.bos_token_id
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in ("Paris", "Up to thirty metres long."))
    assert max_new_tokens == longest + MARGIN_TOKENS


def test_max_new_tokens_is_capped_by_the_sequence_length(tokenizer, dataset):
    policy = FakePolicy(tokenizer)
    samples = first_val_samples(dataset, tokenizer, 1)
    print_val_samples(policy, samples, tokenizer, step=1, max_total_sequence_length=5, print_fn=lambda _: None)
    assert policy.calls[0][1] == 5


def test_more_than_the_split_prints_all_of_it(tokenizer, dataset):
    samples = first_val_samples(dataset, tokenizer, 10)
    assert [s.target for s in samples] == ["Paris", "Up to thirty metres long.", "Never printed."]


def _run(dataset, tokenizer, policy, num_samples):
    cfg = SimpleNamespace(
        logger=SimpleNamespace(num_val_samples_to_print=num_samples),
        data=SimpleNamespace(add_bos=True),
        policy=SimpleNamespace(max_total_sequence_length=256, tokenizer=SimpleNamespace(chat_template_kwargs=None)),
    )
    return SimpleNamespace(cfg=cfg, val_dataloader=SimpleNamespace(dataset=dataset), tokenizer=tokenizer, policy=policy)


def test_validation_prints_through_the_progress_reporter(tokenizer, dataset):
    out = io.StringIO()
    reporter = ProgressReporter(total_steps=10, file=out, live=False)
    sft._print_val_samples(_run(dataset, tokenizer, FakePolicy(tokenizer), 1), step=3, reporter=reporter)
    num_new_tokens = len(tokenizer(CONTINUATIONS[0], add_special_tokens=False)["input_ids"]) + 1
    expected = format_val_sample(
        1, 1, step=3, prompt=_expected_prompt(tokenizer, ROWS[0]), target="Paris",
        continuation="Paris, of course", num_new_tokens=num_new_tokens,
    )
    assert out.getvalue() == expected + "\n"


def test_zero_samples_print_nothing_and_cost_nothing(tokenizer):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"{name} used with num_val_samples_to_print=0")

    out = io.StringIO()
    reporter = ProgressReporter(total_steps=10, file=out, live=False)
    sft._print_val_samples(_run(Untouchable(), Untouchable(), Untouchable(), 0), step=3, reporter=reporter)
    assert out.getvalue() == ""


def test_message_text_of_parts_and_tool_calls():
    assert message_text({"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == "ab"
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    assert message_text({"role": "assistant", "content": None, "tool_calls": [call]}) == (
        '[{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]'
    )


# ---------------------------------------------------------------- sft.val_generation


def _gen_run(dataset, tokenizer, policy, **val_generation):
    run = _run(dataset, tokenizer, policy, 0)
    run.cfg.sft = SimpleNamespace(val_generation=ValGenerationConfig(**val_generation))
    return run


def test_val_generation_scores_the_greedy_answers_against_the_targets(tokenizer, dataset):
    from nemo_rl.algorithms.eval_metrics import squad_scores

    policy = FakePolicy(tokenizer)
    scores = sft._val_generation_scores(_gen_run(dataset, tokenizer, policy, enabled=True, num_prompts=2))
    # "Paris, of course" vs "Paris": EM 0, P = 1/3, R = 1, F1 = 1/2; "About 30 m" vs "Up to thirty metres long.": 0, 0
    expected = [squad_scores("Paris, of course", ["Paris"]), squad_scores("About 30 m", ["Up to thirty metres long."])]
    assert scores == {"gen_exact_match": 0.0, "gen_f1": pytest.approx((expected[0]["f1"] + expected[1]["f1"]) / 2)}
    assert scores["gen_f1"] == pytest.approx(1 / 4)
    assert len(policy.calls[0][0]) == 2

    policy = FakePolicy(tokenizer)
    sft._val_generation_scores(_gen_run(dataset, tokenizer, policy, enabled=True, num_prompts=1, max_new_tokens=5))
    assert policy.calls[0][1] == 5


def test_val_generation_scores_against_every_gold_answer_the_row_keeps(tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Ada Bramwood"}],
             "gold_answers": ["Ada Bramwood", "Paris, of course"]}, ROWS[1]]
    dataset = SFTDataset(rows, tokenizer, TaskDataSpec("squad"), tokenization(max_seq_length=256), source="validation")
    samples = first_val_samples(dataset, tokenizer, 2)
    assert [s.gold_answers for s in samples] == [["Ada Bramwood", "Paris, of course"], ["Up to thirty metres long."]]
    scores = sft._val_generation_scores(_gen_run(dataset, tokenizer, FakePolicy(tokenizer), enabled=True, num_prompts=2))
    # "Paris, of course" matches the second gold exactly: EM and F1 1 for the first row, 0 for the second
    assert scores == {"gen_exact_match": 0.5, "gen_f1": 0.5}


def test_val_generation_math_accuracy_and_off_costs_nothing(tokenizer, dataset):
    class MathPolicy(FakePolicy):
        def generate_greedy(self, prompts, *, max_new_tokens):
            return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in [r"\boxed{Paris}", "no"]][: len(prompts)]

    scores = sft._val_generation_scores(_gen_run(dataset, tokenizer, MathPolicy(tokenizer), enabled=True, num_prompts=2, metric="math"))
    assert scores == {"gen_accuracy": 0.5}
    assert sft._val_generation_scores(_gen_run(dataset, tokenizer, None, enabled=False)) == {}
