"""Shared by the whole-run tests (resume, faults, multi-node, Slurm): a small data set, one
uninterrupted reference run, made once per session, and the Ray head the runs that end on
their own attach to."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.functional.ray_nodes import SharedRayHead
from tests.functional.sft_runs import run_args, run_to_end, step_metrics, write_small_squad

# The most workers a run on the shared head asks for (the tensor-parallel quickstart: TP 2 x DP 2).
SHARED_HEAD_CPUS = 4


@dataclass
class ReferenceRun:
    data_dir: Path
    ckpt_dir: Path  # step_1 ... step_6, every one kept
    metrics: dict[int, tuple[float, float]]  # {step: (loss, valid tokens)}


@pytest.fixture(scope="session")
def shared_ray_head() -> SharedRayHead:
    # Short: Ray's unix sockets live under the head's temp dir.
    root = Path(tempfile.mkdtemp(prefix="nrl-head-", dir="/tmp"))
    head = SharedRayHead(root, num_cpus=SHARED_HEAD_CPUS)
    try:
        yield head
    finally:
        head.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, shared_ray_head) -> ReferenceRun:
    """6 steps over 2 epochs of 3 steps, on 2 workers, a checkpoint after every step."""
    root = tmp_path_factory.mktemp("reference")
    data_dir = write_small_squad(root / "data")
    rc, output = run_to_end(run_args(root, data_dir), root / "output.txt", env=shared_ray_head.env)
    assert rc == 0, output[-4000:]
    return ReferenceRun(data_dir, root / "ckpt", step_metrics(root / "logs"))
