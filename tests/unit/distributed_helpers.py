"""Run a test scenario in fresh processes and bring back what each returned.

`run_ranks(world_size, scenario, *args)`: `scenario(rank, *args)` in `world_size` processes that
form one torch.distributed group (RANK, WORLD_SIZE, MASTER_ADDR/PORT set; gloo on CPU); returns
the scenario's results in rank order. `run_in_fresh_process(fn, *args)`: `fn(*args)` once, in a
process with no state inherited from the test process (no Ray, no process group).

A rank that raises or dies fails the call at once, naming the rank and carrying its traceback, and
the other ranks (likely blocked in a collective waiting for it) are killed; a scenario still
running after `timeout_s` fails the call the same way instead of hanging the suite.

Results and errors travel through files written with `torch.save`, so they may hold tensors and
need not fit a pipe; scenarios and their arguments must be picklable (module-level functions).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as torch_mp

# Generous for a 2-core machine shared with other jobs; a hung collective still fails.
DEFAULT_TIMEOUT_S = 300.0

# Imported once by the fork server, so each process it forks starts with torch, transformers and
# the worker already loaded (seconds saved per process).
_PRELOAD = ["nemo_rl.models.policy.workers.dtensor_policy_worker"]


class RankFailed(RuntimeError):
    """A scenario process raised, died or timed out; `rank` is which one (None: a timeout of all)."""

    def __init__(self, message: str, rank: int | None):
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, scenario: Callable[..., Any], *args, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    """`scenario(rank, *args)` on every rank of a fresh `world_size`-process group; the results
    in rank order.

    Raises:
        RankFailed: a rank raised (its traceback in the message), died, or the ranks were still
            running after `timeout_s`.
    """
    port = free_port()
    rank_envs = [
        dict(RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for r in range(world_size)
    ]
    calls = [(scenario, (r, *args)) for r in range(world_size)]
    return _run_processes(calls, rank_envs, timeout_s, what=f"{scenario.__qualname__} on {world_size} ranks")


def run_in_fresh_process(fn: Callable[..., Any], *args, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """`fn(*args)` in a new process; its result. Raises RankFailed (rank 0) as `run_ranks` does."""
    (result,) = _run_processes([(fn, args)], [{}], timeout_s, what=fn.__qualname__)
    return result


def _process_entry(env: dict[str, str], fn: Callable, args: tuple, out: str) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        result = fn(*args)
    except BaseException as e:
        torch.save({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, out)
        raise SystemExit(1) from None
    torch.save({"result": result}, out)


def _run_processes(calls: list[tuple[Callable, tuple]], envs: list[dict], timeout_s: float, what: str) -> list:
    torch_mp.set_forkserver_preload(_PRELOAD)  # no effect once the fork server runs
    context = torch_mp.get_context("forkserver")
    with tempfile.TemporaryDirectory(prefix="ranks_") as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(len(calls))]
        processes = [
            context.Process(target=_process_entry, args=(env, fn, args, out), daemon=True)
            for (fn, args), env, out in zip(calls, envs, outs, strict=True)
        ]
        for p in processes:
            p.start()
        try:
            _wait_all_or_first_failure(processes, outs, timeout_s, what)
        finally:
            for p in processes:  # after a failure the others may sit in a collective forever
                if p.is_alive():
                    p.kill()
                p.join()
        return [torch.load(out, weights_only=False)["result"] for out in outs]


def _wait_all_or_first_failure(processes: list, outs: list[str], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    running = {p.sentinel: rank for rank, p in enumerate(processes)}
    while running:
        ended = wait(list(running), timeout=max(0.0, deadline - time.monotonic()))
        if not ended:
            ranks = sorted(running.values())
            raise RankFailed(f"{what}: ranks {ranks} still running after {timeout_s:g} s (a hung collective?)", None)
        for sentinel in ended:
            rank = running.pop(sentinel)
            processes[rank].join()
            if processes[rank].exitcode != 0:
                raise RankFailed(_failure_message(rank, len(processes), processes[rank].exitcode, outs[rank], what), rank)


def _failure_message(rank: int, world_size: int, exitcode: int, out: str, what: str) -> str:
    if os.path.exists(out):
        report = torch.load(out, weights_only=False)
        return f"{what}: rank {rank} of {world_size} raised {report['error']}\n--- rank {rank} traceback ---\n{report['traceback']}"
    return f"{what}: rank {rank} of {world_size} died (exit code {exitcode}) without a result"
