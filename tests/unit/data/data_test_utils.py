"""Helpers shared by the data tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from nemo_rl.config.schema import PolicyConfig, TokenizerConfig
from nemo_rl.data.processors import TokenizationOptions

TINY_LLAMA = Path(__file__).resolve().parents[3] / "assets" / "tiny-llama"

# The config's defaults (policy.tokenizer, data.*, sft.only_unmask_final) with a generous length limit.
DEFAULT_TOKENIZATION = TokenizationOptions(
    tokenizer=str(TINY_LLAMA),
    chat_template="default",
    chat_template_kwargs=None,
    add_bos=True,
    add_eos=True,
    add_generation_prompt=False,
    answer_only_loss_mask=True,
    only_unmask_final=False,
    max_seq_length=4096,
    overlength="truncate",
)


def tokenization(**changes) -> TokenizationOptions:
    """`DEFAULT_TOKENIZATION` with `changes` (e.g. add_bos=False, max_seq_length=32)."""
    return replace(DEFAULT_TOKENIZATION, **changes)


def tiny_policy_section(**changes) -> PolicyConfig:
    """A `policy` section over the embedded tiny Llama, micro-batch 1, with `changes`."""
    fields = dict(
        model_name=str(TINY_LLAMA),
        tokenizer=TokenizerConfig(name=str(TINY_LLAMA)),
        train_global_batch_size=4,
        train_micro_batch_size=1,
        max_total_sequence_length=64,
    )
    return PolicyConfig(**{**fields, **changes})
