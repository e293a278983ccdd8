"""Timer: named, accumulating, reducible."""

from __future__ import annotations

import time

import pytest

from nemo_rl.utils.timer import Timer


def test_time_accumulates_and_reduces():
    timer = Timer()
    for _ in range(2):
        with timer.time("step"):
            time.sleep(0.01)
    assert timer.get("step") >= 0.02
    assert timer.get("step", "count") == 2
    assert timer.get("step", "mean") == pytest.approx(timer.get("step") / 2)
    assert set(timer.get_timing_metrics()) == {"step"}


def test_time_records_even_when_the_body_raises():
    timer = Timer()
    with pytest.raises(RuntimeError, match="boom"):
        with timer.time("step"):
            raise RuntimeError("boom")
    assert timer.get("step", "count") == 1


def test_reset_and_errors():
    timer = Timer()
    with timer.time("a"):
        pass
    timer.reset()
    with pytest.raises(KeyError, match="'a'"):
        timer.get("a")
    with pytest.raises(RuntimeError, match="not started"):
        timer.stop("b")
    timer.start("b")
    with pytest.raises(RuntimeError, match="already running"):
        timer.start("b")
