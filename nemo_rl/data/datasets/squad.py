"""SQuAD: reading comprehension as a three-turn chat.

context -> system, question -> user, the first answer -> assistant; every gold answer is kept in
`gold_answers` (SQuAD's dev set has several per question, and the official score is the best
over them), which evaluation scores against and training ignores. `data_path` is a Hub name
(default `rajpurkar/squad`) or a local folder in the same schema (`assets/squad-tiny`); both load
through the same `datasets.load_dataset` call. The train split becomes `train`, the validation
split `validation`.
"""

from __future__ import annotations

from typing import Any

from nemo_rl.data.datasets.common import check_conversation, require_key, require_text
from nemo_rl.data.datasets.local_files import load_hf_dataset
from nemo_rl.data.interfaces import DataError, TaskDataSpec


def format_squad(row: dict[str, Any], *, where: str) -> dict[str, Any]:
    answers = require_key(row, "answers", where=where, needed_by="squad format")
    texts = answers.get("text") if isinstance(answers, dict) else None
    if not texts or not isinstance(texts[0], str) or not texts[0].strip():
        raise DataError(
            f"{where}: answers.text must hold at least one non-empty answer, got {answers!r:.120}"
        )
    messages = [
        {"role": "system", "content": require_text(row, "context", where=where, needed_by="squad format")},
        {"role": "user", "content": require_text(row, "question", where=where, needed_by="squad format")},
        {"role": "assistant", "content": texts[0]},
    ]
    check_conversation(messages, where=where)
    gold_answers = list(dict.fromkeys(t for t in texts if isinstance(t, str) and t.strip()))
    return {"messages": messages, "gold_answers": gold_answers}


class SquadDataset:
    def __init__(
        self,
        data_path: str = "rajpurkar/squad",
        config_path: str = "data.train",
    ):
        import datasets

        splits = load_hf_dataset(data_path, split=None, config_path=config_path)
        if "train" not in splits:
            raise DataError(
                f"{config_path}.data_path={data_path!r} has no 'train' split; splits there: {list(splits)}"
            )
        self.formatted_ds = {}
        for split in ("train", "validation"):
            if split not in splits:
                self.formatted_ds[split] = None
                continue
            rows = [
                format_squad(row, where=f"{data_path} split {split} row {i}")
                for i, row in enumerate(splits[split].to_list())
            ]
            self.formatted_ds[split] = datasets.Dataset.from_list(rows)
        self.task_spec = TaskDataSpec("squad")
