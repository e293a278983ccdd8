"""PreservingDataset: rows kept as plain Python objects, exactly as written.

A Hugging Face `Dataset` stores rows in Arrow, which gives every row one schema: when tool-call
arguments differ between rows (`{"query": ...}` here, `{"expression": ..., "precision": ...}`
there), each row gets every key, the missing ones set to None. That silently teaches a model to
emit arguments that do not exist. `openai_format` with `use_preserving_dataset: true` uses this
class instead, so each row is exactly the JSON object read from the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


class PreservingDataset(Sequence):
    """A list of row dicts with the few `datasets.Dataset` methods the pipeline uses."""

    def __init__(self, rows: list[dict[str, Any]]):
        self._rows = list(rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        return self._rows[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows)

    def __repr__(self) -> str:
        return f"PreservingDataset(num_rows={len(self)})"

    def select(self, indices) -> PreservingDataset:
        return PreservingDataset([self._rows[i] for i in indices])

    def to_list(self) -> list[dict[str, Any]]:
        return list(self._rows)
