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


# Each wrong dotted path or constructor argument is one ConfigError naming the key, raised by
# setup before the data is read (a DataError would follow) and before Ray starts.
@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"optimizer": {"name": "torch.optim.AdamWW"}}, "policy.optimizer.name='torch.optim.AdamWW': module 'torch.optim' has no attribute 'AdamWW'"),
        ({"optimizer": {"name": "torch.optimx.AdamW"}}, "policy.optimizer.name='torch.optimx.AdamW': cannot import module 'torch.optimx'"),
        ({"optimizer": {"name": "AdamW"}}, "policy.optimizer.name='AdamW' is not a dotted path"),
        ({"optimizer": {"name": "torch.optim.AdamW", "kwargs": {"lrr": 1e-5}}}, "policy.optimizer.kwargs.lrr: torch.optim.AdamW takes no argument 'lrr' (did you mean 'lr'?)"),
        ({"optimizer": {"name": "torch.optim.AdamW", "kwargs": {"lr": -1.0}}}, "policy.optimizer: torch.optim.AdamW(**{'lr': -1.0}) failed: Invalid learning rate: -1.0"),
        (
            {"scheduler": [{"name": "torch.optim.lr_scheduler.LinearLR", "kwargs": {"start_factr": 0.1}}]},
            "policy.scheduler[0].kwargs.start_factr: torch.optim.lr_scheduler.LinearLR takes no argument 'start_factr'",
        ),
        (
            {"scheduler": {"name": "torch.optim.lr_scheduler.CosineAnnealingLR"}},
            "policy.scheduler.kwargs: torch.optim.lr_scheduler.CosineAnnealingLR(**{}): missing a required argument: 'T_max'",
        ),
        (
            {"scheduler": [{"name": "torch.optim.lr_scheduler.LinearLR"}, {"name": "torch.optim.lr_scheduler.Cosine"}, {"milestones": [2]}]},
            "policy.scheduler[1].name='torch.optim.lr_scheduler.Cosine': module 'torch.optim.lr_scheduler' has no attribute 'Cosine'",
        ),
        ({"hf_config_overrides": {"rope_thetaa": 1.0}}, "policy.hf_config_overrides.rope_thetaa: LlamaConfig has no attribute 'rope_thetaa'"),
    ],
)
def test_a_wrong_class_or_argument_is_one_line_naming_the_key_before_data_or_ray(tmp_path, monkeypatch, policy, message):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sft, "init_ray", lambda **_: pytest.fail("Ray started"))
    with pytest.raises(ConfigError) as error:
        sft.setup(_config(tmp_path, policy=policy))
    assert str(error.value) == message or str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_valid_classes_arguments_and_overrides_pass_the_check(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = _config(tmp_path, policy={
        "optimizer": {"name": "torch.optim.SGD", "kwargs": {"lr": 0.1, "momentum": 0.9}},
        "scheduler": [
            {"name": "torch.optim.lr_scheduler.LinearLR", "kwargs": {"start_factor": 0.1, "total_iters": 2}},
            {"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {"factor": 1.0}},
            {"milestones": [2]},
        ],
        "hf_config_overrides": {"max_position_embeddings": 4096},
    })
    with pytest.raises(DataError):  # past the check: the data path does not exist
        sft.setup(cfg)


class _RecordingLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step, prefix=""):
        self.logged.append((prefix, step, metrics))


@pytest.mark.parametrize(
    "policy",
    [
        {"dtensor_cfg": {"lora_cfg": {"enabled": True, "dim": 8, "alpha": 16}}},
        {
            "dtensor_cfg": {"enabled": False, "lora_cfg": {"enabled": True, "dim": 2, "alpha": 4}},  # not the active backend's
            "megatron_cfg": {"enabled": True, "peft": {"enabled": True, "dim": 8, "alpha": 16}},
            "optimizer": None,
            "precision": "float32",
        },
    ],
    ids=["dtensor", "megatron"],
)
def test_parameter_line_names_the_active_backends_lora_settings(tmp_path, capsys, policy):
    cfg = _config(tmp_path, policy=policy)
    counts = {"trainable": 1_000, "total": 101_000, "lora_modules": 8}
    logger = _RecordingLogger()
    sft._log_parameter_counts(counts, cfg.policy, logger, first_run=True)
    line = capsys.readouterr().out.splitlines()[0]
    assert line == "parameters: 1,000 trainable of 101,000 (0.99%); LoRA dim 8, alpha 16 on 8 linear layers"
    assert logger.logged == [("params", 0, {"trainable": 1_000, "total": 101_000})]
