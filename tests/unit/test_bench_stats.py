"""The throughput benchmark's round order and statistics (benchmarks/bench_stats.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH_STATS = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_stats.py"


@pytest.fixture(scope="module")
def stats():
    spec = importlib.util.spec_from_file_location("bench_stats", BENCH_STATS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_round_runs_every_configuration_once(stats):
    order = stats.interleaved_order(["a", "b", "c"], 5)
    assert len(order) == 5
    assert all(sorted(round_) == ["a", "b", "c"] for round_ in order)


def test_the_first_configuration_rotates(stats):
    order = stats.interleaved_order(["a", "b", "c"], 4)
    assert [round_[0] for round_ in order] == ["a", "b", "c", "a"]
    assert order[1] == ["b", "c", "a"]
    # Over a full rotation each configuration directly follows every position equally often.
    assert sorted(round_.index("a") for round_ in order[:3]) == [0, 1, 2]


def test_order_refuses_bad_input(stats):
    with pytest.raises(ValueError, match="rounds"):
        stats.interleaved_order(["a"], 0)
    with pytest.raises(ValueError, match="distinct"):
        stats.interleaved_order(["a", "a"], 2)


def test_summary_is_median_and_relative_range(stats):
    summary = stats.summarize([3.0, 1.0, 2.0, 10.0])
    assert summary["median"] == 2.5
    assert (summary["min"], summary["max"], summary["n"]) == (1.0, 10.0, 4)
    assert summary["spread"] == pytest.approx(9.0 / 2.5)
    with pytest.raises(ValueError):
        stats.summarize([])


def test_ratios_pair_rounds_and_skip_unmeasured_ones(stats):
    assert stats.paired_ratios([2.0, 3.0, None, 8.0], [1.0, 6.0, 5.0, None]) == [2.0, 0.5]
    with pytest.raises(ValueError, match="rounds differ"):
        stats.paired_ratios([1.0], [1.0, 2.0])


def test_paired_ratio_cancels_a_shared_load_swing(stats):
    # Both configurations slow down 3x in round 2: each one's tokens/s swings 3x, while the
    # per-round ratio stays 0.9 with (almost) no spread.
    ours = [900.0, 300.0, 882.0]
    reference = [1000.0, 333.3, 980.0]
    ratios = stats.summarize(stats.paired_ratios(ours, reference))
    assert ratios["median"] == pytest.approx(0.9, abs=0.001)
    assert ratios["spread"] < 0.01
    assert stats.summarize(ours)["spread"] > 0.5
