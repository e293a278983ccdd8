"""Shared by the whole-run tests (resume, faults, multi-node, Slurm): a small data set and one
uninterrupted reference run, made once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.functional.sft_runs import run_args, run_to_end, step_metrics, write_small_squad


@dataclass
class ReferenceRun:
    data_dir: Path
    ckpt_dir: Path  # step_1 ... step_6, every one kept
    metrics: dict[int, tuple[float, float]]  # {step: (loss, valid tokens)}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> ReferenceRun:
    """6 steps over 2 epochs of 3 steps, on 2 workers, a checkpoint after every step."""
    root = tmp_path_factory.mktemp("reference")
    data_dir = write_small_squad(root / "data")
    rc, output = run_to_end(run_args(root, data_dir), root / "output.txt")
    assert rc == 0, output[-4000:]
    return ReferenceRun(data_dir, root / "ckpt", step_metrics(root / "logs"))
