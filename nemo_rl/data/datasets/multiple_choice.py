"""Multiple choice: a question, its choices and the index of the right one, from a local
JSONL/JSON file or a Hub dataset.

Each row `{"question": ..., "choices": [...], "answer_index": i}` (optionally `"context"`,
which becomes the system turn) becomes the chat question -> the right choice, and keeps
`choices` and `answer_index`, which evaluation (`eval.benchmark=multiple_choice`) scores by
log-likelihood; fine-tuning on it trains the right answers.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from nemo_rl.data.datasets.common import check_conversation, read_formatted, require_key, require_text
from nemo_rl.data.interfaces import DataError, TaskDataSpec


def format_multiple_choice(row: dict[str, Any], *, where: str, config_path: str) -> dict[str, Any]:
    question = require_text(row, "question", where=where, config_path=config_path)
    choices = require_key(row, "choices", where=where, needed_by="the multiple_choice format")
    answer = require_key(row, "answer_index", where=where, needed_by="the multiple_choice format")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of 2 or more non-empty strings, got {choices!r:.120}")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer_index' must be an index into the {len(choices)} choices, got {answer!r}")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": choices[answer]}]
    if row.get("context"):
        messages.insert(0, {"role": "system", "content": require_text(row, "context", where=where, config_path=config_path)})
    check_conversation(messages, where=where)
    return {"messages": messages, "choices": list(choices), "answer_index": answer}


class MultipleChoiceDataset:
    def __init__(self, data_path: str | None = None, split: str | None = None, config_path: str = "data.train"):
        if not data_path:
            raise DataError(f"{config_path}.data_path is required for multiple_choice (a JSONL/JSON file or a Hub name)")
        format_row = partial(format_multiple_choice, config_path=config_path)
        self.formatted_ds = {"train": read_formatted(data_path, format_row, split=split, config_path=config_path),
                             "validation": None}
        self.task_spec = TaskDataSpec("multiple_choice")
