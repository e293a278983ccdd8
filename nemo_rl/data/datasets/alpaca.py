"""Alpaca-style instruction tuning: `instruction`, optional `input`, `output` per row.

The user message is the instruction, followed by a blank line and the input when the input is
not empty; the output is the assistant message. `data_path` defaults to `tatsu-lab/alpaca` on
the Hub; local JSONL/JSON files work the same way. `input_key`/`output_key` rename the input
and output fields, `kwargs: {instruction_key: ...}` the instruction field.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from nemo_rl.data.datasets.common import read_formatted, require_text
from nemo_rl.data.interfaces import TaskDataSpec


def format_alpaca(
    row: dict[str, Any],
    *,
    instruction_key: str,
    input_key: str,
    output_key: str,
    where: str,
    config_path: str,
) -> dict[str, Any]:
    instruction = require_text(
        row, instruction_key, where=where, option="kwargs.instruction_key", config_path=config_path
    )
    extra = row.get(input_key)
    if extra is not None:
        extra = require_text(row, input_key, where=where, option="input_key", config_path=config_path)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    response = require_text(
        row, output_key, where=where, option="output_key", config_path=config_path, allow_empty=False
    )
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


class AlpacaDataset:
    def __init__(
        self,
        data_path: str = "tatsu-lab/alpaca",
        input_key: str = "input",
        output_key: str = "output",
        instruction_key: str = "instruction",
        split: str | None = None,
        config_path: str = "data.train",
    ):
        format_row = partial(
            format_alpaca,
            instruction_key=instruction_key,
            input_key=input_key,
            output_key=output_key,
            config_path=config_path,
        )
        train = read_formatted(data_path, format_row, split=split, config_path=config_path)
        self.formatted_ds = {"train": train, "validation": None}
        self.task_spec = TaskDataSpec("alpaca")
