"""get_tokenizer: the four chat template modes and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.config.schema import TokenizerConfig
from nemo_rl.data.tokenizer import PASSTHROUGH_TEMPLATE, get_tokenizer

REPO = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_LLAMA = REPO / "assets" / "tiny-llama"


CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_default_is_the_tokenizers_own_template():
    own = (TINY_LLAMA / "chat_template.jinja").read_text()
    assert get_tokenizer(TokenizerConfig(name=str(TINY_LLAMA))).chat_template == own
    explicit = get_tokenizer(TokenizerConfig(name=str(TINY_LLAMA), chat_template="default"))
    assert explicit.chat_template == own


def test_default_without_a_template_is_an_error(plain_tokenizer_dir):
    with pytest.raises(
        ValueError, match=r"chat_template='default' but the tokenizer .* has no chat template"
    ):
        get_tokenizer(TokenizerConfig(name=str(plain_tokenizer_dir)))


def test_none_is_passthrough(plain_tokenizer):
    tok = plain_tokenizer(None)
    assert tok.chat_template == PASSTHROUGH_TEMPLATE
    assert tok.apply_chat_template(CHAT, tokenize=False) == "HiHello"


def test_inline_template(plain_tokenizer):
    tok = plain_tokenizer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    assert tok.apply_chat_template(CHAT, tokenize=False) == "<user>Hi<assistant>Hello"


def test_jinja_file(plain_tokenizer):
    tok = plain_tokenizer(str(FIXTURES / "chat_template.jinja"))
    assert tok.chat_template == (FIXTURES / "chat_template.jinja").read_text()
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    assert rendered == "<|begin_of_text|>### User\nHi\n### Assistant\nHello<|eot_id|>"


def test_missing_template_file_names_the_path(plain_tokenizer_dir):
    with pytest.raises(ValueError, match=r"'templates/missing\.jinja': no such template file"):
        get_tokenizer(TokenizerConfig(name=str(plain_tokenizer_dir), chat_template="templates/missing.jinja"))


def test_invalid_jinja_is_reported(plain_tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="inline template is not valid Jinja"):
        get_tokenizer(
            TokenizerConfig(name=str(plain_tokenizer_dir), chat_template="{% for m in messages %}{{ m }}")
        )
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ bos_token }\n")
    with pytest.raises(ValueError, match=f"{bad} is not valid Jinja"):
        get_tokenizer(TokenizerConfig(name=str(plain_tokenizer_dir), chat_template=str(bad)))


def test_missing_pad_token_falls_back_to_eos(plain_tokenizer, tokenizer):
    tok = plain_tokenizer(None)
    assert tok.pad_token == tok.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token == "<|pad|>"  # a tokenizer's own pad token is kept
