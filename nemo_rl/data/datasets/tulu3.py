"""Tulu 3 SFT mixture (`allenai/tulu-3-sft-mixture`): chat conversations in a `messages` column.

Each row's `messages` (`[{"role", "content"}, ...]`, optionally starting with a system message)
is the conversation as it stands; the last message must be the assistant's. The other columns
(`id`, `source`) are not used. The Hub dataset has one split, train: like NeMo RL, 5% of it
becomes validation (`split_validation_size`, under `seed`) unless the config says otherwise or
gives `data.validation`.
"""

from __future__ import annotations

from nemo_rl.data.datasets.common import as_rows, check_conversation, read_columns
from nemo_rl.data.interfaces import DataError, TaskDataSpec

HUB_ID = "allenai/tulu-3-sft-mixture"
NAME = "tulu3_sft_mixture"


class Tulu3SftMixtureDataset:
    DEFAULT_SPLIT_VALIDATION_SIZE = 0.05

    def __init__(self, data_path: str = HUB_ID, split: str = "train", config_path: str = "data.train"):
        located = read_columns(
            data_path,
            {"messages": "the conversation"},
            split=split,
            dataset_name=NAME,
            config_path=config_path,
        )
        rows = []
        for where, row in located:
            messages = row["messages"]
            check_conversation(messages, where=where, require_final_assistant=True)
            # only role and content: Arrow would otherwise give every message every key of any row
            rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
        if not rows:
            raise DataError(f"{config_path}.data_path={data_path!r} split {split!r} holds no rows")
        self.formatted_ds = {"train": as_rows(rows, config_path=config_path), "validation": None}
        self.task_spec = TaskDataSpec(NAME)
