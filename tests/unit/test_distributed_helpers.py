"""run_ranks / run_in_fresh_process: results in rank order, a failing rank named with its
traceback while its peer is blocked in a collective, and a hung group failing instead of hanging."""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.distributed as dist
from tests.unit.distributed_helpers import RankFailed, run_in_fresh_process, run_ranks


def _all_reduce_rank_plus_one(rank: int, scale: float) -> tuple:
    dist.init_process_group("gloo")
    t = torch.tensor([scale * (rank + 1)])
    dist.all_reduce(t)
    env = (os.environ["RANK"], os.environ["WORLD_SIZE"])
    dist.destroy_process_group()
    return rank, env, t


def _rank_1_raises_while_rank_0_waits(rank: int) -> None:
    dist.init_process_group("gloo")
    if rank == 1:
        raise ValueError("bad shard on rank 1")
    dist.all_reduce(torch.ones(1))  # never completes: rank 1 does not join


def _hangs(rank: int) -> None:
    threading.Event().wait()


_STATE: dict[str, bool] = {}


def _state_seen() -> dict[str, bool]:
    return dict(_STATE)


def test_results_come_back_in_rank_order_from_one_process_group():
    results = run_ranks(2, _all_reduce_rank_plus_one, 10.0)
    assert [(rank, env) for rank, env, _ in results] == [(0, ("0", "2")), (1, ("1", "2"))]
    for _, _, t in results:
        torch.testing.assert_close(t, torch.tensor([30.0]))  # 10 * 1 + 10 * 2


def test_a_raising_rank_is_named_with_its_traceback_and_its_blocked_peer_ends():
    with pytest.raises(RankFailed) as info:
        run_ranks(2, _rank_1_raises_while_rank_0_waits)
    assert info.value.rank == 1
    message = str(info.value)
    assert "rank 1 of 2 raised ValueError: bad shard on rank 1" in message
    assert "Traceback (most recent call last)" in message and "in _rank_1_raises_while_rank_0_waits" in message


def test_a_hung_scenario_fails_after_the_timeout():
    with pytest.raises(RankFailed, match=r"ranks \[0, 1\] still running after 1 s") as info:
        run_ranks(2, _hangs, timeout_s=1)
    assert info.value.rank is None


def test_a_fresh_process_inherits_no_state_from_the_test_process(monkeypatch):
    monkeypatch.setitem(_STATE, "set_in_the_test_process", True)  # as `ray.init` would leave its own
    assert run_in_fresh_process(_state_seen) == {}
