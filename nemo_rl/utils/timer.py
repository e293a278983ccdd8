"""Named wall-clock timers for the driver loop.

    timer = Timer()
    with timer.time("total_step_time"):
        with timer.time("data_processing"):
            ...
    logger.log_metrics(timer.get_timing_metrics(), step, prefix="timing/train")
    timer.reset()

A name timed several times before `reset()` accumulates every duration; `get` reduces them
(sum by default). Measures host time: code that launches GPU work synchronizes first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

Reduction = Literal["sum", "mean", "max", "min", "last", "count"]


class Timer:
    def __init__(self) -> None:
        self._durations: dict[str, list[float]] = {}
        self._started: dict[str, float] = {}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Time the body of the `with` block under `name`."""
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def start(self, name: str) -> None:
        if name in self._started:
            raise RuntimeError(f"timer {name!r} is already running")
        self._started[name] = time.perf_counter()

    def stop(self, name: str) -> float:
        """Stop `name` and return the duration just measured, in seconds."""
        try:
            started = self._started.pop(name)
        except KeyError:
            raise RuntimeError(f"timer {name!r} was not started") from None
        duration = time.perf_counter() - started
        self._durations.setdefault(name, []).append(duration)
        return duration

    def get(self, name: str, reduction: Reduction = "sum") -> float:
        """Seconds recorded under `name` since the last reset, reduced."""
        durations = self._durations.get(name)
        if not durations:
            raise KeyError(
                f"timer {name!r} has no measurement; timed so far: {sorted(self._durations)}"
            )
        return _reduce(durations, reduction)

    def get_timing_metrics(self, reduction: Reduction = "sum") -> dict[str, float]:
        """Every finished timer, reduced: `{name: seconds}`."""
        return {name: _reduce(d, reduction) for name, d in self._durations.items() if d}

    def reset(self, name: str | None = None) -> None:
        """Forget the measurements of `name`, or of every timer (running ones included)."""
        if name is None:
            self._durations.clear()
            self._started.clear()
        else:
            self._durations.pop(name, None)
            self._started.pop(name, None)


def _reduce(durations: list[float], reduction: Reduction) -> float:
    if reduction == "sum":
        return sum(durations)
    if reduction == "mean":
        return sum(durations) / len(durations)
    if reduction == "max":
        return max(durations)
    if reduction == "min":
        return min(durations)
    if reduction == "last":
        return durations[-1]
    if reduction == "count":
        return float(len(durations))
    raise ValueError(f"unknown reduction {reduction!r}; one of sum, mean, max, min, last, count")
