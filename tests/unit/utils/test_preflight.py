"""preflight: unwritable directories and too little room for a checkpoint fail before training."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from nemo_rl.config import load_config
from nemo_rl.utils import preflight as preflight_module
from nemo_rl.utils.preflight import (
    PreflightError,
    count_parameters,
    estimate_checkpoint_bytes,
    preflight,
)

REPO = Path(__file__).resolve().parents[3]
TINY_MODEL = REPO / "assets" / "tiny-llama"


def tiny_cfg(tmp_path, *overrides: str):
    return load_config(
        str(REPO / "configs" / "sft_tiny.yaml"),
        [
            f"policy.model_name={TINY_MODEL}",
            f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
            f"logger.log_dir={tmp_path / 'logs'}",
            *overrides,
        ],
    )


def test_count_parameters_equals_the_loaded_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    assert count_parameters(str(TINY_MODEL)) == sum(p.numel() for p in model.parameters())


def test_estimate_adds_weights_adam_moments_and_the_hf_copy():
    full = estimate_checkpoint_bytes(1000)
    assert (full.weights_bytes, full.optimizer_bytes, full.hf_bytes) == (4000, 8000, 4000)
    assert estimate_checkpoint_bytes(1000, optimizer_name="torch.optim.SGD").optimizer_bytes == 4000
    assert estimate_checkpoint_bytes(1000, save_optimizer=False).total_bytes == 8000
    lora = estimate_checkpoint_bytes(1000, lora=True)
    assert lora.total_bytes < full.total_bytes / 10
    assert estimate_checkpoint_bytes(1000, lora=True, save_merged=True).hf_bytes == 4000 + lora.hf_bytes


def test_writable_dirs_with_room_pass_and_are_created(tmp_path):
    preflight(tiny_cfg(tmp_path))
    assert (tmp_path / "ckpt").is_dir() and (tmp_path / "logs").is_dir()
    assert not list((tmp_path / "ckpt").iterdir())  # the probe file is gone


def test_a_path_under_a_file_is_not_a_writable_directory(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PreflightError, match=r"logger.log_dir=.*a_file/logs is not a writable directory"):
        preflight(tiny_cfg(tmp_path, f"logger.log_dir={tmp_path / 'a_file' / 'logs'}"))


def test_too_little_room_names_the_dir_the_need_and_the_ways_out(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(PreflightError) as error:
        preflight(tiny_cfg(tmp_path))
    text = str(error.value)
    assert "checkpointing.checkpoint_dir=" in text and "has 0.0 MiB free" in text
    assert f"{count_parameters(str(TINY_MODEL)):,} parameters" in text
    assert "checkpointing.save_optimizer=false" in text


def test_disabled_checkpointing_checks_only_the_log_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda path: pytest.fail("space was checked"))
    preflight(tiny_cfg(tmp_path, "checkpointing.enabled=false"))
    assert not (tmp_path / "ckpt").exists()


def test_a_model_that_cannot_be_counted_skips_the_space_check(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda path: pytest.fail("space was checked"))
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    preflight(tiny_cfg(tmp_path, f"policy.model_name={empty}"))
    assert "free space not checked" in caplog.text


def test_the_space_check_uses_the_checkpoint_filesystem(tmp_path, monkeypatch):
    seen = []
    real = shutil.disk_usage
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda path: seen.append(Path(path)) or real(path))
    preflight(tiny_cfg(tmp_path))
    assert seen == [tmp_path / "ckpt"]
