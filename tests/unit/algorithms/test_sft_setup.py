"""sft.setup's first steps, before any data is read or Ray starts: the device is resolved and
the batch split checked where the job runs, and the header names the checkpoint that
`checkpointing.resume` actually selected."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_rl.algorithms import sft
from nemo_rl.config import ConfigError, MasterConfig
from nemo_rl.data import DataError

REPO = Path(__file__).resolve().parents[3]


def _config(tmp_path: Path, **sections) -> MasterConfig:
    raw = {
        "sft": {"max_num_steps": 5},
        "policy": {
            "model_name": "assets/tiny-llama", "tokenizer": {"name": "assets/tiny-llama"},
            "train_global_batch_size": 4, "train_micro_batch_size": 1, "max_total_sequence_length": 64,
        },
        # a data path that does not exist: setup fails there, after the header, before Ray
        "data": {"max_input_seq_length": 64, "train": {"dataset_name": "squad", "data_path": str(tmp_path / "missing")}},
        "checkpointing": {"checkpoint_dir": str(tmp_path / "ckpt")},
        "logger": {"log_dir": str(tmp_path / "logs")},
        "cluster": {"device": "cpu", "cpu_workers_per_node": 2},
    }
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return MasterConfig.model_validate(raw)


def _checkpoint(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    (path / "training_info.json").write_text(json.dumps({"step": step}))
    return path


def test_header_names_the_checkpoint_resume_selected(tmp_path, capsys):
    _checkpoint(tmp_path / "ckpt" / "step_2", 2)
    chosen = _checkpoint(tmp_path / "other_run" / "step_4", 4)  # not in checkpoint_dir
    with pytest.raises(DataError):
        sft.setup(_config(tmp_path, checkpointing={"resume": str(chosen)}))
    header = capsys.readouterr().out
    assert "resumes from" in header and str(chosen) in header
    assert str(tmp_path / "ckpt" / "step_2") not in header


def test_header_says_nothing_of_resuming_with_resume_never(tmp_path, capsys):
    with pytest.raises(DataError):
        sft.setup(_config(tmp_path, checkpointing={"resume": "never"}))
    assert "resumes from" not in capsys.readouterr().out


def test_auto_device_batch_split_is_checked_where_the_job_runs(tmp_path, monkeypatch):
    """With device auto the schema cannot know the world size; setup checks it once resolved."""
    cfg = _config(tmp_path, cluster={"device": "auto", "cpu_workers_per_node": 3})  # 4 rows over 3 workers
    monkeypatch.setattr(sft, "resolve_device", lambda requested: "cpu")
    with pytest.raises(ConfigError, match=r"must split evenly over 3 data-parallel ranks \(3 workers.*cluster.device=auto resolved to cpu"):
        sft.setup(cfg)


def test_explicit_device_batch_split_is_refused_at_validation(tmp_path):
    with pytest.raises(ValueError, match="must split evenly over 3 data-parallel ranks \\(3 workers"):
        _config(tmp_path, cluster={"device": "cpu", "cpu_workers_per_node": 3})


def test_validating_a_config_imports_no_torch():
    """A login node without GPUs validates a config exactly as the job's node does: no device probe."""
    code = (
        "import sys\n"
        "from nemo_rl.config import load_config\n"
        "for path in ['configs/sft.yaml', 'configs/sft_tiny.yaml', 'configs/sft_tiny_lora.yaml']:\n"
        "    load_config(path, ['cluster.device=auto'])\n"
        "assert 'torch' not in sys.modules, 'validating a config imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
