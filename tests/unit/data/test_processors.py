"""Loss masks and token ids from sft_processor / SFTDataset.

Every expected mask here is computed independently of nemo_rl.data.processors: the test renders
the prompt part and the full conversation itself (with the tokenizer's apply_chat_template, with
jinja2 directly, or by joining contents for passthrough), tokenizes them, and derives the loss
positions from the token counts.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from nemo_rl.config.schema import TokenizerConfig
from nemo_rl.data.interfaces import DataError, TaskDataSpec
from nemo_rl.data.processors import SFTDataset, TemplateError, sft_processor
from nemo_rl.data.tokenizer import get_tokenizer
from tests.unit.data.data_test_utils import tokenization

REPO = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_LLAMA = REPO / "assets" / "tiny-llama"

SINGLE = [
    {"role": "system", "content": "Ada Lovelace was born in London in 1815."},
    {"role": "user", "content": "Where was Ada Lovelace born?"},
    {"role": "assistant", "content": "London"},
]
MULTI = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo."},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": "22 degrees, sunny", "tool_call_id": "call_1"},
    {"role": "assistant", "content": "It is 22 degrees and sunny in Paris."},
]
SPEC = TaskDataSpec("test")


def process(tokenizer, messages, *, tools=None, spec=SPEC, **options):
    row = {"messages": messages} if tools is None else {"messages": messages, "tools": tools}
    datum = sft_processor(row, tokenizer, spec, tokenization(**options), idx=0)
    return datum["input_ids"].tolist(), datum["token_mask"].tolist()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages, tools=None, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False
    )


def loss_positions(mask: list[int]) -> list[int]:
    return [t for t, m in enumerate(mask) if m]


def turn_positions(tokenizer, messages, turns, tools=None, generation_prompt=False) -> list[int]:
    """Token positions of the given assistant turns: from the token count of everything before the
    turn (with the generation prompt if asked) to the token count of everything up to its end."""
    positions = []
    for a in turns:
        start = len(encode(tokenizer, render(tokenizer, messages[:a], tools, generation_prompt)))
        end = len(encode(tokenizer, render(tokenizer, messages[: a + 1], tools)))
        positions += range(start, end)
    return positions


# ---------------------------------------------------------------- the tokenizer's own template


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_default_template_single_turn(tokenizer, generation_prompt):
    ids, mask = process(tokenizer, SINGLE, add_generation_prompt=generation_prompt)

    prompt_text = render(tokenizer, SINGLE[:-1], generation_prompt=generation_prompt)
    full_text = render(tokenizer, SINGLE)
    assert full_text.startswith(prompt_text)
    prompt_ids = encode(tokenizer, prompt_text)
    completion_ids = encode(tokenizer, full_text[len(prompt_text) :])
    # The template ends the turn with <|eot_id|>; EOS (<|end_of_text|>) is appended and carries loss.
    assert ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert mask == [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)
    # Cutting at the prompt does not change the tokens: the whole text tokenizes the same.
    assert ids[:-1] == encode(tokenizer, full_text)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_exactly_one_bos_and_one_eos(tokenizer, generation_prompt):
    ids, _ = process(tokenizer, SINGLE, add_generation_prompt=generation_prompt)
    # The template renders {{ bos_token }} and the post-processor would add another: neither doubles.
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the post-processor's BOS, avoided


def test_add_generation_prompt_moves_assistant_header_into_prompt(tokenizer):
    header_text = render(tokenizer, SINGLE[:-1], generation_prompt=True)[
        len(render(tokenizer, SINGLE[:-1])) :
    ]
    header_ids = encode(tokenizer, header_text)
    assert "assistant" in header_text and header_ids

    ids, with_prompt = process(tokenizer, SINGLE, add_generation_prompt=True)
    _, without = process(tokenizer, SINGLE, add_generation_prompt=False)
    start = len(encode(tokenizer, render(tokenizer, SINGLE[:-1])))
    header = range(start, start + len(header_ids))
    assert ids[header.start : header.stop] == header_ids
    assert [with_prompt[t] for t in header] == [0] * len(header)  # prompt: no loss
    assert [without[t] for t in header] == [1] * len(header)  # part of the assistant turn
    # The content, its <|eot_id|> and the EOS carry loss.
    learned = tokenizer.decode([i for i, m in zip(ids, with_prompt) if m])
    assert learned == "London<|eot_id|>" + tokenizer.eos_token


def test_default_template_multi_turn_masks_every_assistant_turn(tokenizer):
    ids, mask = process(tokenizer, MULTI)
    expected = turn_positions(tokenizer, MULTI, [2, 4, 6]) + [len(ids) - 1]
    assert loss_positions(mask) == expected
    assert ids[:-1] == encode(tokenizer, render(tokenizer, MULTI))


def test_default_template_multi_turn_with_generation_prompt(tokenizer):
    ids, mask = process(tokenizer, MULTI, add_generation_prompt=True)
    expected = turn_positions(tokenizer, MULTI, [2, 4, 6], generation_prompt=True) + [len(ids) - 1]
    assert loss_positions(mask) == expected
    assert ids[:-1] == encode(tokenizer, render(tokenizer, MULTI))
    learned = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "Paris.<|eot_id|>Rome.<|eot_id|>Tokyo.<|eot_id|>" + tokenizer.eos_token


def test_only_unmask_final_masks_the_last_assistant_turn_only(tokenizer):
    ids, mask = process(tokenizer, MULTI, only_unmask_final=True)
    assert loss_positions(mask) == turn_positions(tokenizer, MULTI, [6]) + [len(ids) - 1]
    all_ids, _ = process(tokenizer, MULTI)
    assert ids == all_ids  # the same tokens, only the mask differs


def test_answer_only_loss_mask_false_trains_every_token_after_the_first(tokenizer):
    ids, mask = process(tokenizer, TOOL_CHAT, tools=TOOLS, answer_only_loss_mask=False)
    answer_ids, answer_mask = process(tokenizer, TOOL_CHAT, tools=TOOLS)
    assert ids == answer_ids  # the same tokens, only the mask differs
    assert ids[0] == tokenizer.bos_token_id and mask == [0] + [1] * (len(ids) - 1)
    assert 0 < sum(answer_mask) < sum(mask)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_tool_calling_conversation(tokenizer, generation_prompt):
    ids, mask = process(tokenizer, TOOL_CHAT, tools=TOOLS, add_generation_prompt=generation_prompt)
    expected = turn_positions(tokenizer, TOOL_CHAT, [1, 3], TOOLS, generation_prompt) + [len(ids) - 1]
    assert loss_positions(mask) == expected
    # The tools reach the template (in the prompt); the call is learned, the tool's answer is not.
    prompt_text = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    learned = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert "get_weather" in prompt_text and "Current weather in a city" in prompt_text
    assert '"city": "Paris"' in learned and "22 degrees, sunny" not in learned
    assert "22 degrees, sunny" in prompt_text and learned.count("<|eot_id|>") == 2


# ---------------------------------------------------------------- passthrough, inline and file templates


@pytest.fixture(scope="module")
def passthrough_tokenizer():
    return get_tokenizer(TokenizerConfig(name=str(TINY_LLAMA), chat_template=None))


def test_passthrough_concatenates_contents(passthrough_tokenizer):
    tok = passthrough_tokenizer
    messages = [
        {"role": "system", "content": "Context: Paris is in France."},
        {"role": "user", "content": " Question: Where is Paris? Answer:"},
        {"role": "assistant", "content": " France"},
    ]
    ids, mask = process(tok, messages)
    prompt_ids = encode(tok, "Context: Paris is in France. Question: Where is Paris? Answer:")
    completion_ids = encode(tok, " France")
    assert ids == [tok.bos_token_id] + prompt_ids + completion_ids + [tok.eos_token_id]
    assert mask == [0] * (1 + len(prompt_ids)) + [1] * (len(completion_ids) + 1)


def test_passthrough_multi_turn_and_no_special_tokens_when_disabled(passthrough_tokenizer):
    tok = passthrough_tokenizer
    messages = [
        {"role": "user", "content": "Q: 1+1? A:"},
        {"role": "assistant", "content": " 2."},
        {"role": "user", "content": " Q: 2+2? A:"},
        {"role": "assistant", "content": " 4."},
    ]
    ids, mask = process(tok, messages, add_bos=False, add_eos=False)
    assert ids == encode(tok, "Q: 1+1? A: 2. Q: 2+2? A: 4.")
    counts = [len(encode(tok, text)) for text in ("Q: 1+1? A:", "Q: 1+1? A: 2.", "Q: 1+1? A: 2. Q: 2+2? A:")]
    assert loss_positions(mask) == [*range(counts[0], counts[1]), *range(counts[2], len(ids))]


def test_token_straddling_prompt_and_answer_carries_loss(passthrough_tokenizer):
    # The answer starts inside a word of the prompt; the whole word is one token of this vocabulary.
    tok = passthrough_tokenizer
    prompt, answer = "By profession, she was an astro", "nomer"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    ids, mask = process(tok, messages, add_bos=False, add_eos=False)
    assert ids == encode(tok, prompt + answer)
    assert tok.convert_ids_to_tokens(ids[-1:]) == ["Ġastronomer"]
    # The shared token is learned, so every answer character is.
    assert mask == [0] * (len(ids) - 1) + [1]


def test_trimmed_whitespace_offsets_before_the_answer_stay_in_the_prompt(plain_tokenizer):
    # GPT-2 style offsets trim spaces, so the space tokens ending the prompt get empty offsets.
    tok = plain_tokenizer(None)
    messages = [{"role": "user", "content": "Answer:   "}, {"role": "assistant", "content": "\nParis"}]
    ids, mask = process(tok, messages, add_bos=False, add_eos=False)
    assert ids == encode(tok, "Answer:   \nParis")
    offsets = tok("Answer:   \nParis", add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    assert (10, 10) in offsets  # the last space token, trimmed to where it ends: the answer's start
    prompt_count = len(encode(tok, "Answer:   "))
    assert mask == [0] * prompt_count + [1] * (len(ids) - prompt_count)


INLINE = (
    "{% for message in messages %}{%- if message['role'] == 'system' %}{{'Context: ' + message['content'].strip()}}"
    "{%- elif message['role'] == 'user' %}{{' Question: ' + message['content'].strip() + ' Answer:'}}"
    "{%- elif message['role'] == 'assistant' %}{{' ' + message['content'].strip()}}{%- endif %}{% endfor %}"
)


def jinja_render(source: str, messages, tokenizer, generation_prompt=False) -> str:
    """Renders like transformers does (trim_blocks, lstrip_blocks), without transformers."""
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(source).render(
        messages=messages,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        add_generation_prompt=generation_prompt,
    )


def test_inline_template_adds_bos_and_eos_it_lacks():
    tok = get_tokenizer(TokenizerConfig(name=str(TINY_LLAMA), chat_template=INLINE))
    ids, mask = process(tok, SINGLE)
    prompt_text = jinja_render(INLINE, SINGLE[:-1], tok)
    full_text = jinja_render(INLINE, SINGLE, tok)
    assert (
        prompt_text
        == "Context: Ada Lovelace was born in London in 1815. Question: Where was Ada Lovelace born? Answer:"
    )
    prompt_ids, completion_ids = encode(tok, prompt_text), encode(tok, full_text[len(prompt_text) :])
    assert ids == [tok.bos_token_id] + prompt_ids + completion_ids + [tok.eos_token_id]
    assert mask == [0] * (1 + len(prompt_ids)) + [1] * (len(completion_ids) + 1)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_jinja_file_template_multi_turn(plain_tokenizer, generation_prompt):
    source = (FIXTURES / "chat_template.jinja").read_text()
    tok = plain_tokenizer(str(FIXTURES / "chat_template.jinja"))
    ids, mask = process(tok, MULTI, add_generation_prompt=generation_prompt)

    expected = []
    for a in (2, 4, 6):  # token counts of the independently rendered text before and through each turn
        start = len(encode(tok, jinja_render(source, MULTI[:a], tok, generation_prompt)))
        expected += range(start, len(encode(tok, jinja_render(source, MULTI[: a + 1], tok))))
    assert ids == encode(tok, jinja_render(source, MULTI, tok))
    assert loss_positions(mask) == expected
    # This tokenizer's EOS is <|eot_id|>, which the template already ends with: nothing is appended.
    assert tok.eos_token == "<|eot_id|>" and ids[-1] == tok.eos_token_id
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    header = "" if generation_prompt else "### Assistant\n"
    assert learned == "".join(f"{header}{answer}<|eot_id|>" for answer in ("Paris.", "Rome.", "Tokyo."))


class WithoutOffsets:
    """A tokenizer as a pure-Python one looks to the processor: no character offsets."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tokenizer(text, **kwargs)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_tokenizer_without_offsets_tokenizes_piece_by_piece(tokenizer, generation_prompt):
    for messages, tools in ((SINGLE, None), (MULTI, None), (TOOL_CHAT, TOOLS)):
        options = {"tools": tools, "add_generation_prompt": generation_prompt}
        assert process(WithoutOffsets(tokenizer), messages, **options) == process(
            tokenizer, messages, **options
        )


def test_chat_template_kwargs_reach_the_template(plain_tokenizer):
    tok = plain_tokenizer("{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ids, _ = process(tok, SINGLE[1:], chat_template_kwargs={"greeting": "Bonjour! "})
    assert tok.decode(ids).startswith(tok.bos_token + "Bonjour! Where was")


def test_prefix_unstable_template_fails_clearly(plain_tokenizer):
    # Earlier assistant turns are abbreviated once a later turn exists (as some reasoning templates do).
    tok = plain_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[earlier answer]"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="prefix") as error:
        process(tok, MULTI)
    assert "messages[:3]" in str(error.value)
    # Training on the final turn only needs the prefix property at that turn.
    ids, mask = process(tok, MULTI, only_unmask_final=True)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Tokyo." + tok.eos_token


def test_template_that_drops_assistant_turns_fails(plain_tokenizer):
    tok = plain_tokenizer(
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DataError, match=r"renders nothing for messages\[2\]"):
        process(tok, SINGLE)


# ---------------------------------------------------------------- task spec: prompt and system prompt files


def test_prompt_file_and_system_prompt_file(tokenizer, tmp_path):
    (tmp_path / "prompt.txt").write_text("Answer briefly: {}")
    (tmp_path / "system.txt").write_text("You are terse.")
    spec = TaskDataSpec(
        "t", prompt_file=str(tmp_path / "prompt.txt"), system_prompt_file=str(tmp_path / "system.txt")
    )
    ids, _ = process(tokenizer, SINGLE[1:], spec=spec)
    expected = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Answer briefly: Where was Ada Lovelace born?"},
        SINGLE[2],
    ]
    assert ids[:-1] == encode(tokenizer, render(tokenizer, expected))
    # A conversation that has a system message keeps it.
    ids, _ = process(tokenizer, SINGLE, spec=spec)
    assert "You are terse." not in tokenizer.decode(ids) and "Ada Lovelace was born" in tokenizer.decode(ids)


def test_prompt_file_without_placeholder_is_reported(tokenizer, tmp_path):
    (tmp_path / "prompt.txt").write_text("Answer {question}")
    spec = TaskDataSpec("t", prompt_file=str(tmp_path / "prompt.txt"))
    with pytest.raises(DataError, match="prompt.txt"):
        SFTDataset([{"messages": SINGLE}], tokenizer, spec, tokenization(max_seq_length=100))


# ---------------------------------------------------------------- over-long samples


def rows_of_lengths(tokenizer):
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    long_answer = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 60}]
    }
    long_prompt = {
        "messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    }
    return [short, long_answer, long_prompt]


def build(tokenizer, rows, mode, max_seq_length):
    return SFTDataset(rows, tokenizer, SPEC, tokenization(max_seq_length=max_seq_length, overlength=mode))


def test_overlength_mask_keeps_truncated_samples_without_loss(tokenizer):
    dataset = build(tokenizer, rows_of_lengths(tokenizer), "mask", 32)
    assert dataset.overlength_counts == {"truncated": 0, "masked": 2, "dropped": 0}
    assert len(dataset) == 3
    assert [d["loss_multiplier"] for d in dataset] == [1.0, 0.0, 0.0]
    assert [d["overlength"] for d in dataset] == [None, "masked", "masked"]
    assert all(d["length"] <= 32 and len(d["input_ids"]) == d["length"] for d in dataset)


def test_overlength_truncate_cuts_the_tail_and_drops_samples_left_without_loss(tokenizer):
    rows = rows_of_lengths(tokenizer)
    full = build(tokenizer, rows, "truncate", 4096)
    dataset = build(tokenizer, rows, "truncate", 32)
    assert dataset.overlength_counts == {"truncated": 1, "masked": 0, "dropped": 1}
    assert [d["idx"] for d in dataset] == [0, 1]
    truncated = dataset[1]
    assert truncated["overlength"] == "truncated" and truncated["loss_multiplier"] == 1.0
    assert truncated["input_ids"].tolist() == full[1]["input_ids"][:32].tolist()
    assert truncated["token_mask"].tolist() == full[1]["token_mask"][:32].tolist()


def test_overlength_truncate_never_leaves_a_sample_without_loss(tokenizer):
    rows = rows_of_lengths(tokenizer) + [{"messages": MULTI}, {"messages": TOOL_CHAT, "tools": TOOLS}]
    for max_seq_length in range(12, 200, 7):
        try:
            dataset = build(tokenizer, rows, "truncate", max_seq_length)
        except DataError as error:  # too short for any assistant token: every sample dropped
            assert "all 5 samples were dropped" in str(error)
            continue
        assert all(d["token_mask"].sum() > 0 for d in dataset)
        assert len(dataset) + dataset.overlength_counts["dropped"] == len(rows)


def test_overlength_drop(tokenizer):
    dataset = build(tokenizer, rows_of_lengths(tokenizer), "drop", 32)
    assert dataset.overlength_counts == {"truncated": 0, "masked": 0, "dropped": 2}
    assert [d["idx"] for d in dataset] == [0]


def test_an_unknown_overlength_mode_is_refused():
    with pytest.raises(ValueError, match=r"data.overlength='cut'; expected one of \['mask', 'truncate', 'drop'\]"):
        tokenization(overlength="cut")


def test_everything_dropped_is_an_error(tokenizer):
    with pytest.raises(DataError, match="all 3 samples were dropped"):
        build(tokenizer, rows_of_lengths(tokenizer), "drop", 4)


# ---------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (
            [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}],
            r"messages\[0\]\.role='assistant'",
        ),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "x"},
                {"role": "assistant", "content": "a"},
            ],
            r"messages\[1\]\.role='system'",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}],
            r"messages\[1\]\.role='bot'",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}],
            r"messages\[1\]: empty assistant turn",
        ),
        ([{"role": "user", "content": "Hi"}], "no assistant message"),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "tool", "content": "x"},
                {"role": "assistant", "content": "a"},
            ],
            r"messages\[1\]\.role='tool'",
        ),
    ],
)
def test_bad_conversations_name_the_row_and_message(tokenizer, messages, match):
    rows = [{"messages": SINGLE}, {"messages": messages}]
    with pytest.raises(DataError, match=match) as error:
        SFTDataset(rows, tokenizer, SPEC, tokenization(max_seq_length=100), source="validation")
    assert str(error.value).startswith("validation row 1: ")


def test_no_rows_is_an_error(tokenizer):
    with pytest.raises(DataError, match="validation: no rows"):
        SFTDataset([], tokenizer, SPEC, tokenization(max_seq_length=100), source="validation")


def test_row_without_messages(tokenizer):
    with pytest.raises(
        DataError, match=r"train row 0: a formatted row needs a 'messages' list; keys there: \['text'\]"
    ):
        SFTDataset([{"text": "hi"}], tokenizer, SPEC, tokenization(max_seq_length=100))


def test_none_filled_message_keys_are_ignored(tokenizer):
    # Arrow gives every message every key seen in the column; None means absent.
    filled = [{**m, "tool_calls": None, "tool_call_id": None} for m in SINGLE]
    assert process(tokenizer, filled) == process(tokenizer, SINGLE)


# ---------------------------------------------------------------- the quickstart's path, end to end


def test_embedded_squad_through_a_dataloader(tokenizer):
    import functools

    import torch

    from nemo_rl.config.schema import DataConfig, DatasetConfig
    from nemo_rl.data.collate import sft_collate
    from nemo_rl.data.datasets import load_datasets

    data = load_datasets(
        DataConfig(
            max_input_seq_length=128,
            train=DatasetConfig(dataset_name="squad", data_path=str(REPO / "assets" / "squad-tiny")),
        )
    )
    validation = SFTDataset(
        data.validation, tokenizer, data.task_spec, tokenization(max_seq_length=128), source="validation"
    )
    assert len(validation) == len(data.validation) and sum(validation.overlength_counts.values()) == 0
    collate = functools.partial(
        sft_collate, pad_token_id=tokenizer.pad_token_id, make_sequence_length_divisible_by=8
    )
    loader = torch.utils.data.DataLoader(validation, batch_size=4, collate_fn=collate, num_workers=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[1] % 8 == 0
    for row in range(4):
        datum = validation[row]
        learned = tokenizer.decode(datum["input_ids"][datum["token_mask"].bool()])
        assert learned.endswith(
            data.validation[row]["messages"][2]["content"] + "<|eot_id|>" + tokenizer.eos_token
        )
