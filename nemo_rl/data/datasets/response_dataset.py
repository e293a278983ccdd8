"""ResponseDataset: prompt/response pairs from a local JSONL/JSON file or a Hub dataset.

Each row's `input_key` (default "input") becomes the user message and `output_key` (default
"output") the assistant message. Rows that already carry `messages` (and optionally `tools`)
pass through unchanged, after the same conversation checks.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from nemo_rl.data.datasets.common import check_conversation, read_formatted, require_text
from nemo_rl.data.interfaces import DataError, TaskDataSpec


def format_response(
    row: dict[str, Any], *, input_key: str, output_key: str, where: str, config_path: str
) -> dict[str, Any]:
    if "messages" in row:
        check_conversation(row["messages"], where=where)
        return {key: row[key] for key in ("messages", "tools") if key in row}
    prompt = require_text(row, input_key, where=where, option="input_key", config_path=config_path)
    response = require_text(
        row, output_key, where=where, option="output_key", config_path=config_path, allow_empty=False
    )
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


class ResponseDataset:
    def __init__(
        self,
        data_path: str | None = None,
        input_key: str = "input",
        output_key: str = "output",
        split: str | None = None,
        config_path: str = "data.train",
    ):
        if not data_path:
            raise DataError(
                f"{config_path}.data_path is required for ResponseDataset (a JSONL/JSON file or a Hub name)"
            )
        format_row = partial(
            format_response, input_key=input_key, output_key=output_key, config_path=config_path
        )
        train = read_formatted(data_path, format_row, split=split, config_path=config_path)
        self.formatted_ds = {"train": train, "validation": None}
        self.task_spec = TaskDataSpec("ResponseDataset")
