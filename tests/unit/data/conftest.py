"""Tokenizers for the data tests.

`tokenizer`: the embedded assets/tiny-llama tokenizer (byte-level BPE, Llama-3 special tokens and
chat template, a post-processor that prepends <|begin_of_text|>), loaded by get_tokenizer.

`plain_tokenizer_dir`: a second tiny byte-level BPE built here in milliseconds, unlike the assets
on purpose: no chat template, no pad token, GPT-2's pre-tokenizer split and offset trimming, and <|eot_id|>
as its EOS token, so a template that ends turns with <|eot_id|> already ends with EOS.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_rl.config.schema import TokenizerConfig
from nemo_rl.data.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[3]
TINY_LLAMA = REPO / "assets" / "tiny-llama"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADERS = ["<|start_header_id|>", "<|end_header_id|>"]

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Where was Ada Lovelace born? She was born in London in 1815.",
    "Context: the tower is 330 metres tall. Question: How tall is the tower? Answer: 330 metres.",
    "system user assistant tool get_weather city unit celsius fahrenheit query expression precision",
    '{"name": "get_weather", "arguments": {"city": "Paris"}} 22 degrees, sunny.',
] * 4


@pytest.fixture(scope="session")
def tokenizer():
    if not (TINY_LLAMA / "tokenizer.json").exists():
        pytest.fail(f"{TINY_LLAMA} is missing; run `uv run python assets/make_assets.py`")
    return get_tokenizer(TokenizerConfig(name=str(TINY_LLAMA)))


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.add_special_tokens([BOS, EOS, *HEADERS, EOT])
    backend.post_processor = processors.Sequence(
        [
            # As GPT-2's and RoBERTa's: offsets are trimmed of spaces.
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(
                single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))]
            ),
        ]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOT)
    directory = tmp_path_factory.mktemp("plain-tokenizer")
    wrapped.save_pretrained(directory)
    return directory


@pytest.fixture
def plain_tokenizer(plain_tokenizer_dir):
    """Fresh per test: tests set different chat templates on it."""

    def make(chat_template):
        return get_tokenizer(TokenizerConfig(name=str(plain_tokenizer_dir), chat_template=chat_template))

    return make
