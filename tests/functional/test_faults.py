"""Faults during a run: a killed worker, a killed driver in the middle of a save, SIGTERM, a
deadline, and a resume on fewer workers. Each continued run is compared with the uninterrupted
`reference_run` (conftest.py): bit-identical on the same number of workers, 1e-5 on fewer.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.functional.sft_runs import (
    FINAL_SAVE_ONLY,
    TOTAL_STEPS,
    assert_same_weights,
    checkpoint_steps,
    is_complete,
    metric_rows,
    run_args,
    run_to_end,
    started,
    step_metrics,
)

pytestmark = pytest.mark.slow

# The runs that kill a driver or a worker start a Ray of their own (the driver does), so that what
# they kill is theirs; the runs that end on their own (the resumes after a fault among them)
# attach to `shared_ray_head`.


def wait_for_logged_step(log_dir: Path, step: int, run, timeout: float = 300) -> None:
    """Until the run's metrics.jsonl holds `step` (the step finished, its save may be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(step_metrics(log_dir), default=0) >= step:
            return
        if run.proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {run.proc.returncode}) before step {step}:\n{run.output[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} was not logged within {timeout} s:\n{run.output[-4000:]}")


def assert_continues_the_reference(tmp_path: Path, reference_run, *, atol: float = 0.0) -> None:
    """Every step's (loss, valid tokens) over all of the runs' logs, and the final weights."""
    metrics = step_metrics(tmp_path / "logs")
    assert sorted(metrics) == list(range(1, TOTAL_STEPS + 1))
    for step, (loss, tokens) in metrics.items():
        ref_loss, ref_tokens = reference_run.metrics[step]
        assert tokens == ref_tokens, f"step {step} saw other samples"
        assert loss == (pytest.approx(ref_loss, rel=atol) if atol else ref_loss), f"step {step}"
    assert_same_weights(tmp_path / "ckpt" / f"step_{TOTAL_STEPS}", reference_run.ckpt_dir / f"step_{TOTAL_STEPS}", atol=atol)


def test_a_killed_worker_ends_the_run_naming_rank_node_and_the_resume_checkpoint(tmp_path, reference_run):
    with started(run_args(tmp_path, reference_run.data_dir), tmp_path / "output.txt") as run:
        wait_for_logged_step(tmp_path / "logs", 2, run)
        while not (tmp_path / "ckpt" / "step_2").exists():  # step 2's save is complete
            assert run.proc.poll() is None, run.output[-4000:]
            time.sleep(0.05)
        os.kill(run.worker_pids()[1], signal.SIGKILL)
        rc = run.finish(timeout=120)  # a driver that missed the death would still be waiting
    output = run.output
    assert rc != 0
    assert "rank 1 of 2" in output and "node " in output, output[-4000:]
    saved = max(checkpoint_steps(tmp_path / "ckpt"))
    assert f"A resume will use {tmp_path / 'ckpt' / f'step_{saved}'}" in output
    assert all(is_complete(p) for p in (tmp_path / "ckpt").glob("step_*"))


def test_with_max_restarts_a_killed_worker_is_replaced_and_the_run_equals_the_reference(tmp_path, reference_run):
    with started(run_args(tmp_path, reference_run.data_dir, "cluster.max_restarts=1"), tmp_path / "output.txt") as run:
        wait_for_logged_step(tmp_path / "logs", 2, run)
        os.kill(run.worker_pids()[0], signal.SIGKILL)
        rc = run.finish()
    output = run.output
    assert rc == 0, output[-4000:]
    assert "restarting the workers (1 of cluster.max_restarts=1)" in output
    assert len(set(run.worker_pids(0).values()) & set(run.worker_pids(-1).values())) == 0  # new processes
    assert_continues_the_reference(tmp_path, reference_run)
    assert [row["fault/worker_restarts"] for row in metric_rows(tmp_path / "logs", "fault/worker_restarts")] == [1]


def test_a_driver_killed_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path, reference_run, shared_ray_head):
    ckpt = tmp_path / "ckpt"
    with started(run_args(tmp_path, reference_run.data_dir), tmp_path / "output.txt") as run:
        deadline = time.monotonic() + 300
        while not (ckpt / "tmp_step_3").exists():
            assert time.monotonic() < deadline and run.proc.poll() is None, run.output[-4000:]
            time.sleep(0.005)
        run.kill_everything()  # SIGKILL to the driver and its Ray processes, mid-save
    assert (ckpt / "tmp_step_3").exists() and not (ckpt / "step_3").exists()
    assert checkpoint_steps(ckpt) == [1, 2] and is_complete(ckpt / "step_2")

    # The same command but for its saves: only the final checkpoint is compared.
    rc, output = run_to_end(
        run_args(tmp_path, reference_run.data_dir, FINAL_SAVE_ONLY), tmp_path / "resumed.txt", env=shared_ray_head.env
    )
    assert rc == 0, output[-4000:]
    assert "removing incomplete" in output and "tmp_step_3" in output
    assert f"resumed from {ckpt / 'step_2'}" in output or ("resumed from" in output and "step_2" in output)
    assert not (ckpt / "tmp_step_3").exists()
    assert_continues_the_reference(tmp_path, reference_run)


def test_sigterm_saves_after_the_current_step_and_a_resume_finishes_the_run(tmp_path, reference_run, shared_ray_head):
    overrides = run_args(tmp_path, reference_run.data_dir, "checkpointing.save_period=100")
    with started(overrides, tmp_path / "output.txt") as run:
        wait_for_logged_step(tmp_path / "logs", 2, run)
        run.signal(signal.SIGTERM)
        rc = run.finish(timeout=120)
    output = run.output
    assert rc == 0, output[-4000:]
    assert "SIGTERM received: finishing the current step, then saving a checkpoint" in output
    steps = checkpoint_steps(tmp_path / "ckpt")
    assert len(steps) == 1 and 2 <= steps[0] < TOTAL_STEPS, steps  # saved at the stop, not on schedule
    assert is_complete(tmp_path / "ckpt" / f"step_{steps[0]}")
    assert max(step_metrics(tmp_path / "logs")) == steps[0]  # no step ran after the save

    rc, output = run_to_end(overrides, tmp_path / "resumed.txt", env=shared_ray_head.env)
    assert rc == 0, output[-4000:]
    assert_continues_the_reference(tmp_path, reference_run)


def test_ctrl_c_under_uv_run_saves_and_exits_cleanly(tmp_path, reference_run):
    # uv is how the README runs everything, the tests included: not an optional tool.
    assert shutil.which("uv"), "this test runs the driver under `uv run`; uv is not on PATH (https://docs.astral.sh/uv/)"
    # A terminal's Ctrl-C signals the whole foreground process group, and `uv run` forwards it
    # to the driver as well: one keypress, delivered twice, must not abort the save.
    overrides = run_args(tmp_path, reference_run.data_dir, "checkpointing.save_period=100")
    with started(overrides, tmp_path / "output.txt", python=("uv", "run", "--no-sync")) as run:
        wait_for_logged_step(tmp_path / "logs", 2, run)
        os.killpg(run.pid, signal.SIGINT)
        rc = run.finish(timeout=120)
    assert rc == 0, run.output[-4000:]
    assert "SIGINT received" in run.output and "interrupted" not in run.output
    steps = checkpoint_steps(tmp_path / "ckpt")
    assert len(steps) == 1 and is_complete(tmp_path / "ckpt" / f"step_{steps[0]}")
    assert not list((tmp_path / "ckpt").glob("tmp_*"))


def test_checkpoint_must_save_by_saves_and_stops(tmp_path, reference_run, shared_ray_head):
    rc, output = run_to_end(
        run_args(tmp_path, reference_run.data_dir, "checkpointing.save_period=100", "checkpointing.checkpoint_must_save_by=00:00:00:01"),
        tmp_path / "output.txt",
        env=shared_ray_head.env,
    )
    assert rc == 0, output[-4000:]
    assert "checkpoint_must_save_by=00:00:00:01" in output
    assert checkpoint_steps(tmp_path / "ckpt") == [1]
    assert is_complete(tmp_path / "ckpt" / "step_1")


def test_resume_on_one_worker_from_a_two_worker_checkpoint_matches(tmp_path, reference_run, shared_ray_head):
    start = reference_run.ckpt_dir / "step_3"
    rc, output = run_to_end(
        run_args(
            tmp_path, reference_run.data_dir, f"checkpointing.resume={start}", "cluster.cpu_workers_per_node=1", FINAL_SAVE_ONLY
        ),
        tmp_path / "output.txt",
        env=shared_ray_head.env,
    )
    assert rc == 0, output[-4000:]
    assert "rank 1" not in output.split("policy workers:")[-1].splitlines()[0]  # one worker
    resumed = step_metrics(tmp_path / "logs")
    assert sorted(resumed) == list(range(4, TOTAL_STEPS + 1))
    for step, (loss, tokens) in resumed.items():
        assert tokens == reference_run.metrics[step][1]
        assert loss == pytest.approx(reference_run.metrics[step][0], rel=1e-5)
    assert_same_weights(tmp_path / "ckpt" / f"step_{TOTAL_STEPS}", reference_run.ckpt_dir / f"step_{TOTAL_STEPS}", atol=1e-5)
