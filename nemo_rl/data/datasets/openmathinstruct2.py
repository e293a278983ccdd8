"""OpenMathInstruct-2 (`nvidia/OpenMathInstruct-2`): math problems with generated solutions.

Columns: `problem` (the user message), `generated_solution` and `expected_answer` (either one is
the assistant message, chosen by `output_key`), `problem_source` (not used). The Hub dataset has
the splits train, train_1M, train_2M and train_5M, and no validation split: NeMo RL's configs set
`split_validation_size` (0.05 when left unset and no `data.validation` is given). A local copy (a
`save_to_disk` folder, parquet/arrow/JSONL files) loads the same way through `data_path`.
`prompt_file: examples/prompts/math.txt` wraps each problem in the instructions of NeMo RL's SFT
guide.
"""

from __future__ import annotations

from nemo_rl.data.datasets.common import as_rows, check_conversation, read_columns, require_text
from nemo_rl.data.interfaces import DataError, TaskDataSpec

HUB_ID = "nvidia/OpenMathInstruct-2"
HUB_SPLITS = ("train", "train_1M", "train_2M", "train_5M")
OUTPUT_KEYS = ("generated_solution", "expected_answer")
NAME = "OpenMathInstruct-2"


class OpenMathInstruct2Dataset:
    DEFAULT_SPLIT_VALIDATION_SIZE = 0.05

    def __init__(
        self,
        data_path: str = HUB_ID,
        split: str = "train_1M",
        output_key: str = "expected_answer",
        config_path: str = "data.train",
    ):
        if output_key not in OUTPUT_KEYS:
            raise DataError(
                f"{config_path}.output_key={output_key!r} for {NAME}; expected one of {list(OUTPUT_KEYS)}"
            )
        if data_path == HUB_ID and split not in HUB_SPLITS:
            raise DataError(f"{config_path}.split={split!r} for {HUB_ID}; its splits are {list(HUB_SPLITS)}")
        columns = {
            "problem": "the user message",
            output_key: f"the assistant message (output_key={output_key!r})",
        }
        located = read_columns(data_path, columns, split=split, dataset_name=NAME, config_path=config_path)
        rows = []
        for where, row in located:
            messages = [
                {"role": "user", "content": require_text(row, "problem", where=where, needed_by=NAME)},
                {
                    "role": "assistant",
                    "content": require_text(
                        row,
                        output_key,
                        where=where,
                        option="output_key",
                        config_path=config_path,
                        allow_empty=False,
                    ),
                },
            ]
            check_conversation(messages, where=where)
            rows.append({"messages": messages})
        if not rows:
            raise DataError(f"{config_path}.data_path={data_path!r} split {split!r} holds no rows")
        self.formatted_ds = {"train": as_rows(rows, config_path=config_path), "validation": None}
        self.task_spec = TaskDataSpec(NAME)
