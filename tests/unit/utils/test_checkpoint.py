"""CheckpointManager: keep_top_k, atomic finalize, latest/best, should_save, must_save_by."""

from __future__ import annotations

import json
import math

import pytest

from nemo_rl.config.schema import CheckpointingConfig
from nemo_rl.utils.checkpoint import (
    CheckpointManager,
    checkpoint_metrics,
    parse_must_save_by,
)


def make_manager(tmp_path, **overrides) -> CheckpointManager:
    cfg = CheckpointingConfig(checkpoint_dir=str(tmp_path / "ckpt"), **overrides)
    return CheckpointManager(cfg)


def save(manager: CheckpointManager, step: int, metrics: dict | None = None):
    """The driver's sequence: tmp dir, workers' files, finalize."""
    info = {"step": step, "epoch": 0, "consumed_samples": 4 * step, "metrics": metrics or {}}
    tmp = manager.init_tmp_checkpoint(step, info, run_config_yaml="sft:\n  max_num_steps: 10\n")
    (tmp / "policy" / "weights").mkdir(parents=True)
    (tmp / "policy" / "weights" / "shard_0.distcp").write_bytes(b"w" * 16)
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text("{}")
    return manager.finalize_checkpoint(tmp)


def steps_on_disk(manager: CheckpointManager) -> list[int]:
    return [step for step, _ in manager.list_checkpoints()]


# ---------------------------------------------------------------- keep_top_k


@pytest.mark.parametrize(
    ("higher_is_better", "expected"),
    [
        # val losses: step 1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 4.0 (latest)
        (False, [2, 4, 5]),  # two lowest (4, 2) + latest
        (True, [1, 5]),  # two highest are 5 and 1; 5 is also the latest
    ],
)
def test_keep_top_k_by_metric_keeps_latest(tmp_path, higher_is_better, expected):
    manager = make_manager(tmp_path, keep_top_k=2, higher_is_better=higher_is_better)
    for step, loss in zip(range(1, 6), [3.0, 1.0, 2.0, 0.5, 4.0]):
        save(manager, step, checkpoint_metrics(val_metrics={"val_loss": loss}))
    assert steps_on_disk(manager) == expected


def test_keep_top_k_latest_kept_even_if_worst(tmp_path):
    manager = make_manager(tmp_path, keep_top_k=1)
    for step, loss in [(1, 1.0), (2, 5.0), (3, 9.0)]:
        save(manager, step, {"val:val_loss": loss})
        assert manager.get_latest_checkpoint_path().name == f"step_{step}"
    assert steps_on_disk(manager) == [1, 3]


def test_keep_top_k_ties_prefer_newer_step(tmp_path):
    manager = make_manager(tmp_path, keep_top_k=2)
    for step in (1, 2, 3, 4):
        save(manager, step, {"val:val_loss": 1.0 if step < 4 else 2.0})
    # the tie among 1, 2, 3 keeps 3 and 2; 4 is the latest
    assert steps_on_disk(manager) == [2, 3, 4]


def test_keep_top_k_missing_metric_ranks_worst(tmp_path):
    manager = make_manager(tmp_path, keep_top_k=2)
    save(manager, 1, {"val:val_loss": 2.0})
    save(manager, 2, {"train:loss": 0.1})  # no validation at this step
    save(manager, 3, {"val:val_loss": float("nan")})  # non-finite counts as missing
    save(manager, 4, {"val:val_loss": 3.0})
    save(manager, 5, {})  # latest, no metric: still kept
    assert steps_on_disk(manager) == [1, 4, 5]


def test_keep_top_k_train_metric(tmp_path):
    manager = make_manager(tmp_path, keep_top_k=1, metric_name="train:loss")
    for step, loss in [(1, 0.5), (2, 0.7), (3, 0.9)]:
        save(manager, step, checkpoint_metrics(train_metrics={"loss": loss}))
    assert steps_on_disk(manager) == [1, 3]


def test_keep_top_k_none_keeps_all(tmp_path):
    manager = make_manager(tmp_path, keep_top_k=None)
    for step in range(1, 5):
        save(manager, step, {"val:val_loss": float(step)})
    assert steps_on_disk(manager) == [1, 2, 3, 4]


def test_keep_top_k_without_metric_keeps_most_recent(tmp_path):
    manager = make_manager(tmp_path, keep_top_k=2, metric_name=None)
    for step in range(1, 5):
        save(manager, step, {"val:val_loss": float(step)})
    assert steps_on_disk(manager) == [3, 4]


# ---------------------------------------------------------------- atomicity


def test_layout_and_training_info(tmp_path):
    manager = make_manager(tmp_path)
    path = save(manager, 7, checkpoint_metrics({"loss": 1.5}, {"val_loss": float("inf")}))
    assert path.name == "step_7"
    assert not (path.parent / "tmp_step_7").exists()
    assert (path / "config.yaml").read_text().startswith("sft:")
    assert (path / "hf" / "config.json").is_file()
    info = json.loads((path / "training_info.json").read_text())  # strict JSON
    assert info == {
        "step": 7,
        "epoch": 0,
        "consumed_samples": 28,
        "metrics": {"train:loss": 1.5, "val:val_loss": None},
    }
    assert manager.load_training_info(path) == info


def test_tmp_dir_is_never_a_checkpoint(tmp_path):
    manager = make_manager(tmp_path)
    save(manager, 1, {"val:val_loss": 1.0})
    # a crash after the workers wrote step 2 but before the rename
    tmp = manager.init_tmp_checkpoint(2, {"step": 2, "metrics": {"val:val_loss": 0.1}})
    (tmp / "hf").mkdir()
    assert steps_on_disk(manager) == [1]
    assert manager.get_latest_checkpoint_path().name == "step_1"
    assert manager.get_best_checkpoint_path().name == "step_1"

    removed = manager.remove_incomplete()
    assert removed == [tmp]
    assert not tmp.exists()
    assert steps_on_disk(manager) == [1]


def test_finalize_over_existing_step_replaces_it(tmp_path):
    manager = make_manager(tmp_path)
    save(manager, 3, {"val:val_loss": 2.0})
    path = save(manager, 3, {"val:val_loss": 1.0})
    assert manager.load_training_info(path)["metrics"] == {"val:val_loss": 1.0}
    assert sorted(p.name for p in manager.checkpoint_dir.iterdir()) == ["step_3"]


def test_interrupted_replacement_is_restored(tmp_path):
    manager = make_manager(tmp_path)
    old = save(manager, 3, {"val:val_loss": 2.0})
    # crash inside finalize: the old step_3 parked aside, the new one not yet renamed in
    new_tmp = manager.init_tmp_checkpoint(3, {"step": 3, "metrics": {}})
    old.rename(old.parent / "tmp_old_step_3")
    assert manager.get_latest_checkpoint_path() is None

    assert manager.remove_incomplete() == [new_tmp]
    assert manager.load_training_info(old)["metrics"] == {"val:val_loss": 2.0}


def test_finalize_rejects_foreign_dirs(tmp_path):
    manager = make_manager(tmp_path)
    (tmp_path / "step_1").mkdir()
    with pytest.raises(ValueError, match="init_tmp_checkpoint"):
        manager.finalize_checkpoint(tmp_path / "step_1")


def test_init_tmp_checkpoint_checks_step(tmp_path):
    manager = make_manager(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        manager.init_tmp_checkpoint(2, {"step": 3})


# ---------------------------------------------------------------- latest / best


def test_latest_and_best(tmp_path):
    manager = make_manager(tmp_path)
    assert manager.get_latest_checkpoint_path() is None
    assert manager.get_best_checkpoint_path() is None
    for step, loss in [(2, 3.0), (10, 1.0), (4, 2.0)]:  # numeric, not lexical, order
        save(manager, step, {"val:val_loss": loss})
    assert manager.get_latest_checkpoint_path().name == "step_10"
    (manager.checkpoint_dir / "step_11").mkdir()  # no training_info.json: not a checkpoint
    assert manager.get_latest_checkpoint_path().name == "step_10"
    save(manager, 12, {})
    assert manager.get_best_checkpoint_path().name == "step_10"


def test_best_is_latest_without_metric(tmp_path):
    manager = make_manager(tmp_path, metric_name=None)
    for step in (1, 2):
        save(manager, step)
    assert manager.get_best_checkpoint_path().name == "step_2"


def test_load_training_info_error_names_the_file(tmp_path):
    manager = make_manager(tmp_path)
    with pytest.raises(FileNotFoundError, match="training_info.json"):
        manager.load_training_info(tmp_path / "nowhere")


# ---------------------------------------------------------------- should_save / deadline


def test_should_save(tmp_path):
    manager = make_manager(tmp_path, save_period=3)
    saved = [s for s in range(1, 11) if manager.should_save(s, is_last_step=s == 10)]
    assert saved == [3, 6, 9, 10]
    off = make_manager(tmp_path, enabled=False)
    assert not off.should_save(3, is_last_step=True)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("00:00:00:30", 30), ("00:03:45:00", 13500), ("01:00:00:01", 86401), ("2:1:1:1", 176461)],
)
def test_parse_must_save_by(text, seconds):
    assert parse_must_save_by(text) == seconds


@pytest.mark.parametrize(
    "text", ["03:45:00", "00:24:00:00", "00:00:60:00", "a:b:c:d", "00:00:00:00", ""]
)
def test_parse_must_save_by_rejects(text):
    with pytest.raises(ValueError, match="checkpoint_must_save_by"):
        parse_must_save_by(text)


def test_bad_must_save_by_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="DD:HH:MM:SS"):
        make_manager(tmp_path, checkpoint_must_save_by="4h")


def test_deadline_reached(tmp_path):
    manager = make_manager(tmp_path, checkpoint_must_save_by="00:00:10:00")
    assert not manager.deadline_reached(start_time=1000.0, now=1000.0 + 599)
    assert manager.deadline_reached(start_time=1000.0, now=1000.0 + 600)
    assert not make_manager(tmp_path).deadline_reached(start_time=0.0)


def test_checkpoint_metrics():
    assert checkpoint_metrics({"loss": 1.0, "lr": 1e-3}, {"val_loss": math.nan}) == {
        "train:loss": 1.0,
        "train:lr": 1e-3,
        "val:val_loss": None,
    }
