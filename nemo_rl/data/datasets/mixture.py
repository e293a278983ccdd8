"""A mixture of datasets: `data.train` (or `data.validation`) given as a list.

As in NeMo RL, the datasets' rows are concatenated in the order of the list, and each row keeps
the task spec (prompt and system prompt files) and the processor of the dataset it came from.
Each dataset's share is its number of rows, which `max_samples` caps (a random choice under the
dataset's `seed`); the loader's sampler then shuffles the whole mixture under `sft.seed`. So the
mixture, like a single dataset, is a function of the config alone.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nemo_rl.data.interfaces import TaskDataSpec


@dataclass(frozen=True)
class MixturePart:
    config_path: str  # "data.train[1]"
    dataset_name: str
    rows: Any  # rows with len() and []
    task_spec: TaskDataSpec
    processor: str


class MixedRows(Sequence):
    """The rows of several datasets one after the other; `part_of(i)` says whose row i is."""

    def __init__(self, parts: list[MixturePart]):
        self.parts = list(parts)
        self._starts: list[int] = []
        total = 0
        for part in self.parts:
            self._starts.append(total)
            total += len(part.rows)
        self._length = total

    def __len__(self) -> int:
        return self._length

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"row {index} of a mixture of {self._length} rows")
        part = bisect.bisect_right(self._starts, index) - 1
        return part, index - self._starts[part]

    def __getitem__(self, index: int) -> dict[str, Any]:
        part, offset = self._locate(index)
        return self.parts[part].rows[offset]

    def part_of(self, index: int) -> MixturePart:
        return self.parts[self._locate(index)[0]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for part in self.parts:
            rows = part.rows.to_list() if hasattr(part.rows, "to_list") else part.rows
            yield from rows

    def to_list(self) -> list[dict[str, Any]]:
        return list(iter(self))

    def summary(self) -> list[dict[str, Any]]:
        """[{dataset, dataset_name, rows}] per part: what the resume fingerprint records."""
        return [
            {"dataset": p.config_path, "dataset_name": p.dataset_name, "rows": len(p.rows)}
            for p in self.parts
        ]

    def __repr__(self) -> str:
        shares = ", ".join(f"{p.config_path}={len(p.rows)}" for p in self.parts)
        return f"MixedRows({shares})"
