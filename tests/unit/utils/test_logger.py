"""Logger: run dirs, JSONL, TensorBoard, W&B offline, MLflow, loss curve."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import yaml

from nemo_rl.config.schema import LoggerConfig
from nemo_rl.utils.logger import Logger, get_next_experiment_dir, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_logger(tmp_path, run_config=None, **overrides) -> Logger:
    return Logger(LoggerConfig(log_dir=str(tmp_path / "logs"), **overrides), run_config=run_config)


def test_run_dirs_are_numbered_and_never_reused(tmp_path):
    first = make_logger(tmp_path)
    second = make_logger(tmp_path)
    assert first.run_dir.name == "exp_001"
    assert second.run_dir.name == "exp_002"
    (tmp_path / "logs" / "exp_041").mkdir()
    assert get_next_experiment_dir(tmp_path / "logs").name == "exp_042"
    first.finish()
    second.finish()


def test_jsonl_lines_have_step_and_prefixed_names(tmp_path):
    logger = make_logger(tmp_path)
    logger.log_metrics({"loss": 2.5, "lr": 1e-3, "num_valid_tokens": 120}, step=1, prefix="train")
    logger.log_metrics({"total_step_time": 0.25}, step=1, prefix="timing/train")
    logger.log_metrics({"val_loss": 2.25}, step=2, prefix="validation")
    lines = logger.metrics_path.read_text().splitlines()
    # each line is flushed as soon as it is logged
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "train/loss": 2.5, "train/lr": 1e-3, "train/num_valid_tokens": 120},
        {"step": 1, "timing/train/total_step_time": 0.25},
        {"step": 2, "validation/val_loss": 2.25},
    ]
    logger.finish()


def test_non_finite_values_are_valid_json_null(tmp_path):
    logger = make_logger(tmp_path)
    metrics = {"loss": math.nan, "grad_norm": math.inf, "x": -math.inf}
    logger.log_metrics(metrics, step=3, prefix="train")
    line = logger.metrics_path.read_text().strip()

    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    assert json.loads(line, parse_constant=reject) == {
        "step": 3,
        "train/loss": None,
        "train/grad_norm": None,
        "train/x": None,
    }
    logger.finish()


def test_numpy_and_torch_scalars(tmp_path):
    logger = make_logger(tmp_path)
    logger.log_metrics({"a": np.float32(0.5), "b": torch.tensor(2.0), "c": np.int64(7)}, step=1)
    assert read_metrics(logger.metrics_path) == [{"step": 1, "a": 0.5, "b": 2.0, "c": 7}]
    with pytest.raises(TypeError, match="'bad'"):
        logger.log_metrics({"bad": [1, 2]}, step=2)
    logger.finish()


def test_hyperparams_written_as_yaml(tmp_path):
    import yaml

    config = {"sft": {"max_num_steps": 10}, "checkpointing": {"checkpoint_dir": tmp_path}}
    logger = make_logger(tmp_path, run_config=config)
    written = yaml.safe_load((logger.run_dir / "config.yaml").read_text())
    assert written == {
        "sft": {"max_num_steps": 10},
        "checkpointing": {"checkpoint_dir": str(tmp_path)},
    }
    logger.finish()


def test_loss_curve_png(tmp_path):
    logger = make_logger(tmp_path)
    for step in range(1, 6):
        logger.log_metrics({"loss": 3.0 / step}, step=step, prefix="train")
        if step % 2 == 0:
            logger.log_metrics({"val_loss": 3.2 / step}, step=step, prefix="validation")
    logger.log_metrics({"loss": math.nan}, step=6, prefix="train")  # skipped, not plotted
    png = logger.finish()
    assert png == logger.run_dir / "loss_curve.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert logger.finish() == png  # idempotent


def test_no_loss_no_curve(tmp_path):
    logger = make_logger(tmp_path)
    logger.log_metrics({"lr": 1.0}, step=1, prefix="train")
    assert logger.finish() is None


def test_tensorboard_event_file_holds_the_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = make_logger(tmp_path, tensorboard_enabled=True)
    logger.log_metrics({"loss": 2.5}, step=1, prefix="train")
    logger.log_metrics({"loss": 2.0}, step=2, prefix="train")
    logger.finish()

    tb_dir = logger.run_dir / "tb_logs"
    assert list(tb_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [(s.step, s.value) for s in scalars] == [(1, 2.5), (2, 2.0)]


def test_wandb_offline_writes_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    # Offline W&B needs no account or network: a failure to start here is a failure.
    logger = make_logger(tmp_path, run_config={"sft": {"seed": 1}}, wandb_enabled=True)
    logger.log_metrics({"loss": 2.5}, step=1, prefix="train")
    logger.finish()
    run_files = list((logger.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert run_files and run_files[0].stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed")
def test_mlflow_missing_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match="uv sync --extra mlflow"):
        make_logger(tmp_path, mlflow_enabled=True)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow extra not installed")
def test_mlflow_local_store(tmp_path):
    from mlflow.tracking import MlflowClient

    logger = make_logger(tmp_path, run_config={"sft": {"seed": 1}}, mlflow_enabled=True)
    logger.log_metrics({"loss": 2.5}, step=1, prefix="train")
    logger.log_metrics({"loss": 2.0}, step=2, prefix="train")
    logger.finish()
    client = MlflowClient(tracking_uri=logger._mlflow.tracking_uri)
    history = client.get_metric_history(logger._mlflow.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.0)]
    assert client.get_run(logger._mlflow.run_id).data.params == {"sft.seed": "1"}


@pytest.mark.skipif(importlib.util.find_spec("swanlab") is not None, reason="swanlab is installed")
def test_swanlab_missing_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match="uv sync --extra swanlab"):
        make_logger(tmp_path, swanlab_enabled=True)


@pytest.mark.skipif(importlib.util.find_spec("swanlab") is None, reason="swanlab extra not installed")
def test_swanlab_offline_run_gets_the_config_and_metrics(tmp_path):
    logger = make_logger(
        tmp_path,
        run_config={"sft": {"seed": 1}},
        swanlab_enabled=True,
        swanlab={"project": "p", "name": "sft-test", "mode": "offline"},
    )
    logger.log_metrics({"loss": 1.5}, step=1, prefix="train")
    logger.log_metrics({"loss": 1.25}, step=2, prefix="train")
    logger.finish()
    (run,) = (logger.run_dir / "swanlog").glob("run-*")
    config = yaml.safe_load((run / "files" / "config.yaml").read_text())
    assert config["sft"]["value"] == {"seed": 1}
    (records,) = run.glob("run-*.swanlab")
    assert b"train/loss" in records.read_bytes()
