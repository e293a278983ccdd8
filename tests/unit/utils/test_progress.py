"""ProgressReporter: plain (non-TTY) lines and the end-of-run summary."""

from __future__ import annotations

import io
import re

import pytest

from nemo_rl.config.schema import MasterConfig
from nemo_rl.utils.progress import ProgressReporter, format_duration, print_run_header

ESCAPE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # any control character but \t and \n


def step_metrics(loss: float) -> dict[str, float]:
    return {
        "train/loss": loss,
        "train/lr": 1e-3,
        "train/num_valid_tokens": 2600,
        "timing/train/total_step_time": 0.5,
    }


def test_plain_lines_have_step_loss_and_no_control_chars(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # must not turn escape codes on in plain mode
    out = io.StringIO()
    progress = ProgressReporter(total_steps=3, file=out)
    assert not progress.live
    for step, loss in [(1, 2.5), (2, 2.3141), (3, 2.0)]:
        progress.update(step, step_metrics(loss))
    progress.update(3, {"validation/val_loss": 1.9})
    progress.print("saved checkpoint step_3")
    progress.summary(
        {
            "steps": 3,
            "total_steps": 3,
            "checkpoint": "results/sft/step_3",
            "model": "results/sft/step_3/hf",
            "log_dir": "logs/exp_001",
            "resumed_from": None,  # left out
        }
    )
    text = out.getvalue()

    assert not ESCAPE.search(text), repr(text)
    lines = text.splitlines()
    assert lines[1].startswith("step 2/3 | loss 2.314 | lr 1.0e-03 | 5.2k tok/s | ETA ")
    assert lines[3].startswith("step 3/3 | loss 2.000 | val 1.900 |")
    assert "saved checkpoint step_3" in lines
    for row in [
        ("steps", "3/3"),
        ("final train loss", "2.000"),
        ("final val loss", "1.900"),
        ("model (HF)", "results/sft/step_3/hf"),
        ("logs", "logs/exp_001"),
    ]:
        assert re.search(r"\s*\|\s*".join(map(re.escape, row)), text), row
    assert "resumed from" not in text


def test_plain_mode_rate_limit_keeps_first_and_last():
    out = io.StringIO()
    progress = ProgressReporter(total_steps=50, file=out, min_interval_s=3600)
    for step in range(1, 51):
        progress.update(step, {"train/loss": 1.0})
    printed = [line.split(" | ")[0] for line in out.getvalue().splitlines()]
    assert printed == ["step 1/50", "step 50/50"]


def test_eta_counts_only_steps_run_here():
    progress = ProgressReporter(total_steps=100, start_step=90, file=io.StringIO())
    assert progress.eta_s() is None
    progress._t0 -= 10.0  # 10 s for the 5 steps since resuming at 90
    progress.update(95)
    assert progress.eta_s() == pytest.approx(10.0, rel=0.05)


def test_live_mode_renders_the_line():
    out = io.StringIO()
    with ProgressReporter(total_steps=4, file=out, live=True) as progress:
        progress.update(1, step_metrics(2.5))
    assert "step 1/4 | loss 2.500" in out.getvalue()


@pytest.mark.parametrize(
    ("seconds", "text"), [(5, "5s"), (70, "1m10s"), (3725, "1h02m"), (90000, "1d01h")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_summary_defaults_come_from_updates(tmp_path):
    (tmp_path / "step_2" / "hf").mkdir(parents=True)
    out = io.StringIO()
    progress = ProgressReporter(total_steps=2, file=out)
    progress.update(2, {"train/loss": 1.25, "validation/val_loss": 1.5})
    progress.summary({"checkpoint": str(tmp_path / "step_2"), "loss_curve": "x.png"})
    text = out.getvalue()
    for row in [("steps", "2/2"), ("final train loss", "1.250"), ("final val loss", "1.500"),
                ("model (HF)", str(tmp_path / "step_2" / "hf")), ("loss curve", "x.png")]:
        assert re.search(r"\s*\|\s*".join(map(re.escape, row)), text), row


TINY_POLICY = {
    "model_name": "assets/tiny-llama",
    "tokenizer": {"name": "assets/tiny-llama"},
    "train_global_batch_size": 4,
    "train_micro_batch_size": 2,
    "max_total_sequence_length": 64,
}


def test_run_header_says_where_things_go(tmp_path):
    cfg = MasterConfig.model_validate(
        {
            "sft": {"max_num_steps": 5},
            "policy": TINY_POLICY,
            "data": {"max_input_seq_length": 64, "train": {"dataset_name": "squad"}},
            "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt"), "keep_top_k": 2},
            "logger": {"log_dir": str(tmp_path / "logs"), "tensorboard_enabled": True},
            "cluster": {"device": "cpu", "cpu_workers_per_node": 2},
        }
    )
    (tmp_path / "logs" / "exp_007").mkdir(parents=True)
    out = io.StringIO()
    print_run_header(cfg, "configs/x.yaml", device="cpu", resumes_from=None, file=out)
    text = out.getvalue()
    assert not ESCAPE.search(text), repr(text)
    for expected in ["configs/x.yaml", "assets/tiny-llama", "squad", "2 cpu worker(s)",
                     str(tmp_path / "ckpt"), "keep top 2 by val:val_loss",
                     str(tmp_path / "logs" / "exp_008"), "tensorboard"]:
        assert expected in text, expected
    assert not (tmp_path / "logs" / "exp_008").exists()  # the header creates nothing


def test_run_header_names_the_checkpoint_it_is_given_to_resume_from(tmp_path):
    """The header shows what `checkpointing.resume` selected (sft.setup passes it), which need
    not be the latest checkpoint in checkpoint_dir; nothing when the run starts fresh."""
    cfg = MasterConfig.model_validate(
        {
            "sft": {"max_num_steps": 5},
            "policy": TINY_POLICY,
            "data": {"max_input_seq_length": 64, "train": {"dataset_name": "squad"}},
            "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
            "logger": {"log_dir": str(tmp_path / "logs")},
        }
    )
    fresh, resumed = io.StringIO(), io.StringIO()
    print_run_header(cfg, device="cuda", resumes_from=None, file=fresh)
    print_run_header(cfg, device="cuda", resumes_from=tmp_path / "elsewhere" / "step_3", file=resumed)
    assert "resumes from" not in fresh.getvalue()
    assert str(tmp_path / "elsewhere" / "step_3") in resumed.getvalue()
    assert "1 cuda worker(s)" in fresh.getvalue()  # cluster.gpus_per_node defaults to 1


def test_run_header_names_every_dataset_of_a_mixture():
    cfg = MasterConfig.model_validate(
        {
            "sft": {"max_num_steps": 5},
            "policy": TINY_POLICY,
            "data": {
                "max_input_seq_length": 64,
                "train": [
                    {"dataset_name": "OpenMathInstruct-2", "max_samples": 1000},
                    {"dataset_name": "tulu3_sft_mixture"},
                ],
                "validation": [{"dataset_name": "squad"}],
            },
            "cluster": {"device": "cpu"},
        }
    )
    out = io.StringIO()
    print_run_header(cfg, device="cpu", resumes_from=None, file=out)
    assert "OpenMathInstruct-2 (max 1000) + tulu3_sft_mixture (validation: squad)" in out.getvalue()
