"""Resuming: a run continued from step k equals the uninterrupted run, and what may not resume.

The uninterrupted run (`reference_run`, conftest.py) trains 6 steps over two epochs of 3 steps
on 2 workers and keeps a checkpoint after every step; a resumed run starts from one of them
(`checkpointing.resume=<path>`) in a new checkpoint dir. fp32 on CPU with the same number of
workers: every per-step loss and every final weight must be bit-identical.
"""

from __future__ import annotations

import json

import pytest

from tests.functional.sft_runs import (
    FINAL_SAVE_ONLY,
    TOTAL_STEPS,
    assert_same_weights,
    checkpoint_steps,
    run_args,
    run_to_end,
    step_metrics,
    write_small_squad,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("resume_step", [2, 3], ids=["inside-an-epoch", "at-the-epoch-boundary"])
def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path, reference_run, shared_ray_head, resume_step):
    start = reference_run.ckpt_dir / f"step_{resume_step}"
    rc, output = run_to_end(
        run_args(tmp_path, reference_run.data_dir, f"checkpointing.resume={start}", FINAL_SAVE_ONLY),
        tmp_path / "output.txt",
        env=shared_ray_head.env,
    )
    assert rc == 0, output[-4000:]
    assert "resumed from" in output and str(start) in output

    # Same batches (valid-token counts) and losses, step for step, and nothing replayed or skipped.
    resumed = step_metrics(tmp_path / "logs")
    assert sorted(resumed) == list(range(resume_step + 1, TOTAL_STEPS + 1))
    assert resumed == {step: reference_run.metrics[step] for step in resumed}

    final = tmp_path / "ckpt" / f"step_{TOTAL_STEPS}"
    assert_same_weights(final, reference_run.ckpt_dir / f"step_{TOTAL_STEPS}")
    info = json.loads((final / "training_info.json").read_text())
    expected = json.loads((reference_run.ckpt_dir / f"step_{TOTAL_STEPS}" / "training_info.json").read_text())
    for key in ("step", "epoch", "consumed_samples", "skipped_updates", "data_fingerprint"):
        assert info[key] == expected[key], key


def test_resume_never_refuses_a_checkpoint_dir_that_has_checkpoints(tmp_path, reference_run):
    before = {p.name: p.stat().st_mtime_ns for p in reference_run.ckpt_dir.iterdir()}
    rc, output = run_to_end(
        [
            *run_args(tmp_path, reference_run.data_dir, "checkpointing.resume=never"),
            f"checkpointing.checkpoint_dir={reference_run.ckpt_dir}",
        ],
        tmp_path / "output.txt",
    )
    assert rc == 1
    assert "checkpointing.resume=never" in output and "step_6" in output, output[-3000:]
    assert "checkpointing.resume=auto" in output  # the ways out are named
    assert "Traceback" not in output
    assert {p.name: p.stat().st_mtime_ns for p in reference_run.ckpt_dir.iterdir()} == before


def test_resume_refuses_a_changed_data_order(tmp_path, reference_run):
    edited = write_small_squad(tmp_path / "edited", edit_row=7)
    rc, output = run_to_end(
        run_args(tmp_path, edited, f"checkpointing.resume={reference_run.ckpt_dir / 'step_3'}", "sft.seed=43"),
        tmp_path / "output.txt",
    )
    assert rc == 1
    assert "data order would differ" in output, output[-3000:]
    assert "sft.seed: 42 -> 43" in output
    assert "the training rows' contents" in output
    assert "Traceback" not in output
    assert not checkpoint_steps(tmp_path / "ckpt")
    assert not list((tmp_path / "logs").glob("exp_*"))  # refused before the run started logging (and Ray)
