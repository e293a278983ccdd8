"""Whole runs of the SFT entry point, as a user starts them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "assets" / "tiny-llama"

pytestmark = pytest.mark.slow


def run_sft(
    *overrides: str, ray_env: dict[str, str], timeout: float = 420, config: str = "sft_tiny.yaml"
) -> subprocess.CompletedProcess:
    """`ray_env`: the Ray cluster the run attaches to (`shared_ray_head.env`, tests/conftest.py)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **ray_env}
    cmd = [sys.executable, str(REPO / "examples" / "run_sft.py"), "--config", str(REPO / "configs" / config), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_quickstart_trains_validates_checkpoints_and_resumes(tmp_path, shared_ray_head):
    ckpt_dir, log_dir = tmp_path / "ckpt", tmp_path / "logs"
    overrides = (
        "sft.max_num_steps=6",
        "sft.val_period=3",
        "sft.val_batches=1",  # 64 rows, at steps 0, 3 and 6: two batches would cost more than the training
        "checkpointing.save_period=2",
        "checkpointing.keep_top_k=1",
        f"checkpointing.checkpoint_dir={ckpt_dir}",
        f"logger.log_dir={log_dir}",
    )
    result = run_sft(*overrides, ray_env=shared_ray_head.env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "run summary" in result.stdout

    metrics = read_jsonl(log_dir / "exp_001" / "metrics.jsonl")
    train_rows = [row for row in metrics if "train/loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2, 3, 4, 5, 6]
    for name in (
        "train/grad_norm",
        "train/lr",
        "train/num_valid_tokens",
        "train/num_valid_samples",
        "timing/train/total_step_time",
        "timing/train/valid_tokens_per_sec_per_worker",
    ):
        assert all(row[name] is not None and row[name] >= 0 for row in train_rows), name
    assert all(row["train/num_valid_samples"] == 16 for row in train_rows)
    val_losses = {row["step"]: row["validation/val_loss"] for row in metrics if "validation/val_loss" in row}
    assert sorted(val_losses) == [0, 3, 6]
    assert val_losses[6] < val_losses[0] - 0.5, val_losses
    assert (log_dir / "exp_001" / "loss_curve.png").stat().st_size > 0

    # Saved at steps 2, 4, 6; keep_top_k=1 by val loss keeps the best scored one and the latest.
    steps = sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*"))
    assert steps[-1] == 6 and len(steps) <= 2
    assert not list(ckpt_dir.glob("tmp_*"))
    final = ckpt_dir / "step_6"
    info = json.loads((final / "training_info.json").read_text())
    assert info["step"] == 6 and info["consumed_samples"] == 96
    assert (final / "config.yaml").exists() and (final / "train_dataloader.pt").exists()

    # The hf/ directory is a complete model: it loads and continues the same text the same way.
    model = AutoModelForCausalLM.from_pretrained(final / "hf")
    tokenizer = AutoTokenizer.from_pretrained(final / "hf")
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    ids = tokenizer("Where was Ada born?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # it trained

    # Running the same command again resumes from the last checkpoint and has nothing left to do.
    again = run_sft(*overrides, ray_env=shared_ray_head.env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stdout
    assert len(read_jsonl(log_dir / "exp_002" / "metrics.jsonl")) <= 1


def test_a_worker_failing_mid_step_ends_the_run_with_its_rank_and_message(tmp_path, shared_ray_head):
    # A model whose vocabulary is smaller than the tokenizer's: the embedding lookup fails inside
    # the workers at the first training step, after setup succeeded.
    small_vocab = tmp_path / "small-vocab-llama"
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(small_vocab)
    shutil.copytree(TINY_MODEL, tmp_path / "tok", ignore=shutil.ignore_patterns("model*", "config.json"))

    result = run_sft(
        f"policy.model_name={small_vocab}",
        f"policy.tokenizer.name={tmp_path / 'tok'}",
        "sft.val_at_start=false",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
        f"logger.log_dir={tmp_path / 'logs'}",
        ray_env=shared_ray_head.env,
        timeout=240,  # a run that hung on the failure would raise TimeoutExpired
    )
    assert result.returncode != 0
    assert "rank" in result.stderr and "index out of range" in result.stderr, result.stderr[-4000:]
    assert "Traceback" in result.stderr  # the worker's own traceback, for debugging
    assert not list((tmp_path / "ckpt").glob("step_*"))


def test_lora_quickstart_with_packing_saves_an_adapter_and_a_merged_model(tmp_path, shared_ray_head):
    from peft import PeftModel
    from safetensors.torch import load_file

    ckpt_dir, log_dir = tmp_path / "ckpt", tmp_path / "logs"
    result = run_sft(
        "sft.max_num_steps=4",
        "sft.val_period=0",
        "sft.val_at_start=false",  # the validation at the end runs LoRA with packing: once is enough
        "sft.val_batches=1",
        "policy.sequence_packing.enabled=true",
        f"checkpointing.checkpoint_dir={ckpt_dir}",
        f"logger.log_dir={log_dir}",
        config="sft_tiny_lora.yaml",
        ray_env=shared_ray_head.env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    total = sum(p.numel() for p in base.parameters())
    line = next(line for line in result.stdout.splitlines() if line.startswith("parameters:"))
    trainable = int(line.split()[1].replace(",", ""))
    assert f"trainable of {total + trainable:,}" in line and "LoRA dim 8" in line
    assert "use_triton=true, but this build has no fused LoRA kernel" in result.stdout
    params = [row for row in read_jsonl(log_dir / "exp_001" / "metrics.jsonl") if "params/trainable" in row]
    assert params == [{"step": 0, "params/trainable": trainable, "params/total": total + trainable}]

    final = ckpt_dir / "step_4"
    adapter = load_file(final / "hf" / "adapter_model.safetensors")
    assert sum(t.numel() for t in adapter.values()) == trainable
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in adapter)
    assert not (final / "hf" / "model.safetensors").exists()
    assert json.loads((final / "hf" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(TINY_MODEL)

    ids = AutoTokenizer.from_pretrained(final / "hf")("Where was Ada born?", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), final / "hf").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(final / "hf_merged")(ids).logits
    assert not torch.allclose(adapted, base_logits)  # the adapter trained
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_megatron_quickstart_trains_checkpoints_exports_hf_and_resumes(tmp_path, shared_ray_head):
    pytest.importorskip("megatron.core")
    ckpt_dir, log_dir = tmp_path / "ckpt", tmp_path / "logs"
    overrides = (
        "sft.val_period=2",
        "sft.val_batches=1",
        "checkpointing.save_period=2",
        "checkpointing.keep_top_k=null",
        f"checkpointing.checkpoint_dir={ckpt_dir}",
        f"logger.log_dir={log_dir}",
    )
    # Two steps and one save show the training, the hf/ export and (below, one more step) the resume.
    result = run_sft("sft.max_num_steps=2", *overrides, config="sft_tiny_megatron.yaml", ray_env=shared_ray_head.env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = read_jsonl(log_dir / "exp_001" / "metrics.jsonl")
    train_rows = [row for row in metrics if "train/loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2]
    assert all(row["train/num_valid_samples"] == 16 and row["train/grad_norm"] > 0 for row in train_rows)
    val_losses = {row["step"]: row["validation/val_loss"] for row in metrics if "validation/val_loss" in row}
    assert sorted(val_losses) == [0, 2] and val_losses[2] < val_losses[0], val_losses

    # hf/ is converted from the Megatron weights at every save: a complete, trained HF model.
    final = ckpt_dir / "step_2"
    model = AutoModelForCausalLM.from_pretrained(final / "hf")
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    ids = AutoTokenizer.from_pretrained(final / "hf")("Where was Ada born?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)

    # One more step resumes from step_2's dist_checkpointing shards.
    again = run_sft("sft.max_num_steps=3", *overrides, config="sft_tiny_megatron.yaml", ray_env=shared_ray_head.env, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stdout
    resumed = [row for row in read_jsonl(log_dir / "exp_002" / "metrics.jsonl") if "train/loss" in row]
    assert [row["step"] for row in resumed] == [3]
