"""The embedded quickstart assets: what `assets/make_assets.py` promises about the files it commits.

Expected renderings are written out by hand here, not produced by the template under test.
"""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"
MODEL_DIR = ASSETS / "tiny-llama"
SQUAD_DIR = ASSETS / "squad-tiny"

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SH, EH, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


def header(role: str) -> str:
    return f"{SH}{role}{EH}\n\n"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def squad_rows() -> dict[str, list[dict]]:
    return {split: read_jsonl(SQUAD_DIR / f"{split}.jsonl") for split in ("train", "validation")}


# --------------------------------------------------------------------------------------------------
# Model and tokenizer
# --------------------------------------------------------------------------------------------------
def test_model_is_the_documented_tiny_llama(model):
    import torch
    from transformers import LlamaForCausalLM

    assert isinstance(model, LlamaForCausalLM)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    config = model.config
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (128, 4, 4, 2)
    assert config.max_position_embeddings == 2048
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.2e6


def test_model_directory_is_small_enough_to_commit():
    total = sum(path.stat().st_size for path in MODEL_DIR.rglob("*") if path.is_file())
    assert total < 5 * 1024 * 1024


def test_tokenizer_fits_the_embedding(tokenizer, model):
    embedding_rows = model.get_input_embeddings().weight.shape[0]
    assert embedding_rows == model.config.vocab_size
    assert embedding_rows % 64 == 0
    assert len(tokenizer) <= embedding_rows
    assert max(tokenizer.get_vocab().values()) < embedding_rows


def test_special_tokens_agree_between_tokenizer_and_model(tokenizer, model):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    ids = tokenizer.convert_tokens_to_ids([BOS, EOS, PAD, SH, EH, EOT])
    assert len(set(ids)) == 6 and tokenizer.unk_token_id not in ids
    for token, token_id in zip([BOS, EOS, PAD, SH, EH, EOT], ids):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token  # never split
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == tuple(ids[:3])
    generation = model.generation_config
    assert generation.bos_token_id == ids[0] and generation.pad_token_id == ids[2]
    assert set(generation.eos_token_id) == {ids[1], ids[5]}  # stops at end of text and end of turn


def test_tokenizer_loads_without_conversion(tokenizer):
    """transformers must use tokenizer.json as written: same ids as the raw `tokenizers` object."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    text = "Felix Bramström was born in Coldholm in 1831. Who?\n\n  x"
    assert tokenizer(text)["input_ids"] == raw.encode(text).ids


def test_bos_is_prepended_like_llama3(tokenizer):
    bos = tokenizer.bos_token_id
    with_special = tokenizer("Where was Ada born?")["input_ids"]
    without = tokenizer("Where was Ada born?", add_special_tokens=False)["input_ids"]
    assert with_special == [bos] + without
    assert bos not in without
    # The chat template emits bos_token itself: encoding its output with add_special_tokens=True gives
    # the double BOS that the processor has to avoid.
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tokenizer(rendered)["input_ids"][:2] == [bos, bos]
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"][:2] != [bos, bos]


ROUND_TRIP_TEXTS = [
    "Where was Zoë Varnström born?",
    "tabs\tand  double  spaces , before punctuation . and trailing   ",
    "\n\nleading newlines\r\nand CRLF\n",
    "日本語のテキスト, emoji 😀🧪, Ελληνικά, עברית, combining é",
    "control \x00\x07\x1b characters and a literal <|eot_id|> token",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_random_unicode_round_trips(tokenizer):
    rng = random.Random(0)
    # Any code point but surrogates, which UTF-8 cannot encode.
    alphabet = [chr(c) for c in range(0x20000) if not 0xD800 <= c <= 0xDFFF]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_vocabulary_was_learned_from_the_dataset(tokenizer):
    """BPE merges from the squad corpus: role names and frequent words are single tokens."""
    for word in ["system", "user", "assistant", " born", " joined"]:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word


# --------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------
SYSTEM_USER_ASSISTANT = [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "Where was Ada born?"},
    {"role": "assistant", "content": "Ashford"},
]

MULTI_TURN = [
    {"role": "system", "content": " Leading space and trailing newline kept\n"},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer."},
    {"role": "user", "content": "  Second,\n\nwith blank lines  "},
    {"role": "assistant", "content": "Second answer.\n"},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_person",
            "description": "Find a person.",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
        },
    }
]

TOOL_CALLING = [
    {"role": "user", "content": "When was Ada Varnley born?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "lookup_person", "arguments": {"name": "Ada"}}}],
    },
    {"role": "tool", "content": '{"born": 1871}'},
    {"role": "assistant", "content": "In 1871."},
]


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_renders_llama3_format(tokenizer):
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nAnswer from the context.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere was Ada born?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAshford<|eot_id|>"
    )
    assert render(tokenizer, SYSTEM_USER_ASSISTANT) == expected


def test_generation_prompt_opens_an_assistant_turn(tokenizer):
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nAnswer from the context.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere was Ada born?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render(tokenizer, SYSTEM_USER_ASSISTANT[:2], add_generation_prompt=True) == expected
    assert render(tokenizer, SYSTEM_USER_ASSISTANT[:2]) == expected.removesuffix(header("assistant"))


def test_contents_are_rendered_verbatim(tokenizer):
    expected = BOS + "".join(header(m["role"]) + m["content"] + EOT for m in MULTI_TURN)
    assert render(tokenizer, MULTI_TURN) == expected


def test_tools_open_a_system_block_when_there_is_none(tokenizer):
    tool_json = json.dumps(TOOLS[0])
    call_json = '{"name": "lookup_person", "arguments": {"name": "Ada"}}'
    expected = (
        BOS
        + header("system") + "Available tools:\n" + tool_json + EOT
        + header("user") + "When was Ada Varnley born?" + EOT
        + header("assistant") + call_json + EOT
        + header("tool") + '{"born": 1871}' + EOT
        + header("assistant") + "In 1871." + EOT
    )  # fmt: skip
    assert render(tokenizer, TOOL_CALLING, tools=TOOLS) == expected


def test_tools_join_the_first_system_block(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}] + TOOL_CALLING[:1]
    expected = (
        BOS
        + header("system") + "Be brief.\n\nAvailable tools:\n" + json.dumps(TOOLS[0]) + EOT
        + header("user") + "When was Ada Varnley born?" + EOT
    )  # fmt: skip
    assert render(tokenizer, messages, tools=TOOLS) == expected


def test_tool_calls_follow_the_content_as_json(tokenizer):
    messages = [
        {
            "role": "assistant",
            "content": "Looking it up.",
            "tool_calls": [
                {"type": "function", "function": {"name": "a", "arguments": {"x": 1, "é": [True, None]}}},
                {"type": "function", "function": {"name": "b", "arguments": '{"y": 2}'}},
            ],
        }
    ]
    expected = (
        BOS + header("assistant") + "Looking it up."
        + '\n{"name": "a", "arguments": {"x": 1, "é": [true, null]}}'
        + '\n{"name": "b", "arguments": "{\\"y\\": 2}"}' + EOT
    )  # fmt: skip
    assert render(tokenizer, messages) == expected


def assert_prefix_property(tokenizer, messages, **kwargs):
    """Each leading slice of the conversation renders, and tokenizes, as a prefix of the whole."""
    full_text = render(tokenizer, messages, **kwargs)
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    for k in range(1, len(messages)):
        prompts = [render(tokenizer, messages[:k], **kwargs)]
        if messages[k]["role"] == "assistant":
            prompts.append(render(tokenizer, messages[:k], add_generation_prompt=True, **kwargs))
        for prompt in prompts:
            assert full_text.startswith(prompt), (k, prompt)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids, k


@pytest.mark.parametrize(
    "messages, tools",
    [
        (SYSTEM_USER_ASSISTANT, None),
        (MULTI_TURN, None),
        (TOOL_CALLING, TOOLS),
        ([{"role": "system", "content": "Be brief."}] + TOOL_CALLING, TOOLS),
    ],
    ids=["single-turn", "multi-turn", "tool-calling", "tool-calling-with-system"],
)
def test_a_prefix_of_the_conversation_renders_as_a_prefix(tokenizer, messages, tools):
    assert_prefix_property(tokenizer, messages, tools=tools)


# --------------------------------------------------------------------------------------------------
# squad-tiny
# --------------------------------------------------------------------------------------------------
SQUAD_KEYS = ["id", "title", "context", "question", "answers"]


def test_row_counts(squad_rows):
    assert 2500 <= len(squad_rows["train"]) <= 3500
    assert 250 <= len(squad_rows["validation"]) <= 350


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_answer_is_a_span_of_its_context(squad_rows, split):
    for line, row in enumerate(squad_rows[split], start=1):
        where = f"{split}.jsonl line {line}"
        assert list(row) == SQUAD_KEYS, where
        assert all(isinstance(row[key], str) and row[key] for key in SQUAD_KEYS[:4]), where
        answers = row["answers"]
        assert list(answers) == ["text", "answer_start"], where
        assert len(answers["text"]) == len(answers["answer_start"]) >= 1, where
        for text, start in zip(answers["text"], answers["answer_start"]):
            assert isinstance(start, int) and text, where
            assert row["context"][start : start + len(text)] == text, where


def test_contexts_have_two_to_five_sentences(squad_rows):
    for row in squad_rows["train"] + squad_rows["validation"]:
        sentences = re.split(r"(?<=\.) ", row["context"])
        assert 2 <= len(sentences) <= 5, row["context"]


def test_ids_are_unique_squad_style_hex(squad_rows):
    ids = [row["id"] for rows in squad_rows.values() for row in rows]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{24}", row_id) for row_id in ids)


def test_questions_cover_who_where_when_what(squad_rows):
    first_words = {row["question"].split()[0] for row in squad_rows["train"]}
    assert {"Who", "Where", "When", "What"} <= first_words


def test_validation_people_are_not_in_train(squad_rows):
    train_titles = {row["title"] for row in squad_rows["train"]}
    validation_titles = {row["title"] for row in squad_rows["validation"]}
    assert validation_titles and not train_titles & validation_titles


def test_loads_like_the_hub_squad(tmp_path):
    import datasets

    loaded = datasets.load_dataset(str(SQUAD_DIR), cache_dir=str(tmp_path))
    assert set(loaded) == {"train", "validation"}
    # rajpurkar/squad's features, as `datasets` reports them.
    squad_features = datasets.Features({
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")),
                    "answer_start": datasets.List(datasets.Value("int32"))},
    })  # fmt: skip
    for split in loaded.values():
        assert split.features == squad_features
    first = read_jsonl(SQUAD_DIR / "validation.jsonl")[0]
    assert loaded["validation"][0] == first
    assert loaded["train"].num_rows == len(read_jsonl(SQUAD_DIR / "train.jsonl"))


# --------------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------------
def relative_files(directory: Path) -> set[Path]:
    return {path.relative_to(directory) for path in directory.rglob("*") if path.is_file()}


@pytest.mark.slow  # trains the tokenizer and writes every asset again in a new process
def test_script_regenerates_the_committed_files_byte_for_byte(tmp_path):
    subprocess.run(
        [sys.executable, str(ASSETS / "make_assets.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for name in ["tiny-llama", "squad-tiny"]:
        committed, regenerated = ASSETS / name, tmp_path / name
        assert relative_files(regenerated) == relative_files(committed), name
        for path in sorted(relative_files(committed)):
            assert (regenerated / path).read_bytes() == (committed / path).read_bytes(), f"{name}/{path}"
