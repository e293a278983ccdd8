"""The types that pass between datasets, the processor, collation and the workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import torch


class DataError(ValueError):
    """Bad training data, reported before training starts.

    The message names where (file and 1-based line for local JSON/JSONL files, the dataset name and
    row index for Hub datasets) and what (the config key or the message field), e.g.
    `data.train.input_key='question' not found in /data/train.jsonl line 17; keys there: ['prompt']`.
    """


@dataclass
class TaskDataSpec:
    """What a dataset tells the processor about its task.

    `prompt_file` holds a Python format string with one `{}` applied to each user message;
    `system_prompt_file` holds a system prompt prepended to conversations that have none.
    """

    task_name: str
    prompt_file: str | None = None
    system_prompt_file: str | None = None

    def __post_init__(self) -> None:
        self.prompt = _read_optional(self.prompt_file)
        self.system_prompt = _read_optional(self.system_prompt_file)


def _read_optional(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()


Message = dict[str, Any]  # {"role": ..., "content": ..., optional "tool_calls", "tool_call_id", ...}


class DatumSpec(TypedDict):
    """One tokenized training sample, as the processor returns it.

    `token_mask_T[t] == 1` means token t is a prediction target: the loss includes the
    log-probability of `input_ids_T[t]` given tokens `< t`.
    """

    input_ids: torch.Tensor  # (T,) int64
    token_mask: torch.Tensor  # (T,) int64, 1 on assistant tokens that carry loss
    length: int
    loss_multiplier: float  # 0.0 for samples that must not contribute (overlength: mask)
    idx: int
    task_name: str
    overlength: str | None  # None, "masked" or "truncated"
