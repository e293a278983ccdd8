"""The benchmark's arithmetic, apart from any timing so that it can be tested: the order in
which configurations take turns, and the statistics reported for each.

On a shared machine the load drifts during a run. Configurations therefore run in rounds,
each configuration once per round, and the starting configuration rotates from round to round,
so that no configuration always follows the same one. A comparison between two configurations
is the median over rounds of their per-round ratio: two runs a few seconds apart saw about the
same load, which a ratio of overall medians does not guarantee.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def interleaved_order(names: Sequence[str], rounds: int) -> list[list[str]]:
    """One list per round, every name once; round r starts at name r mod len(names)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be distinct: {list(names)}")
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)] if n else [[] for _ in range(rounds)]


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median, min, max and the spread, (max - min) / median, of `values` (one per round)."""
    if not values:
        raise ValueError("no values to summarize")
    median = statistics.median(values)
    low, high = min(values), max(values)
    return {
        "median": median,
        "min": low,
        "max": high,
        "spread": (high - low) / median if median else float("nan"),
        "n": len(values),
    }


def paired_ratios(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> list[float]:
    """numerator / denominator of each round in which both were measured (None: not measured)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"rounds differ: {len(numerators)} vs {len(denominators)}")
    return [a / b for a, b in zip(numerators, denominators) if a is not None and b is not None and b > 0]
