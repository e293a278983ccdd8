"""ResponseDataset: prompt/response pairs from a local JSONL/JSON file or a Hub dataset.

Each row's `input_key` (default "input") becomes the user message and `output_key` (default
"output") the assistant message. Rows that already carry `messages` (and optionally `tools`)
pass through unchanged, after the same conversation checks.
"""

from __future__ import annotations

from typing import Any

from nemo_rl.data.datasets.common import as_rows, check_conversation, finish_splits, require_text
from nemo_rl.data.datasets.local_files import load_rows
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
        split_validation_size: float | None = None,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
        config_path: str = "data.train",
    ):
        if not data_path:
            raise DataError(
                f"{config_path}.data_path is required for ResponseDataset (a JSONL/JSON file or a Hub name)"
            )
        rows = [
            format_response(
                row, input_key=input_key, output_key=output_key, where=where, config_path=config_path
            )
            for where, row in load_rows(data_path, split=split, config_path=config_path)
        ]
        if not rows:
            raise DataError(f"{config_path}.data_path={data_path!r} holds no rows")
        self.formatted_ds = finish_splits(
            as_rows(rows, config_path=config_path),
            None,
            split_validation_size=split_validation_size,
            seed=seed,
        )
        self.task_spec = TaskDataSpec(
            "ResponseDataset", prompt_file=prompt_file, system_prompt_file=system_prompt_file
        )
