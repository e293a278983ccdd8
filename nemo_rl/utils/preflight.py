"""Checks made before any worker starts, so that a run does not fail at its first save.

    preflight(cfg)   # raises PreflightError with what to change

- `checkpointing.checkpoint_dir` (when checkpointing is enabled) and `logger.log_dir` must be
  directories this process can create and write to;
- the checkpoint directory's filesystem must have room for one more checkpoint, estimated from
  the parameter count (`estimate_checkpoint_bytes`).

The estimate, for P parameters (counted on a weightless meta-device copy of the model):
    fp32 master weights (DCP)       4 P
    optimizer state (DCP)           4 P x k   k = 2 for Adam-style optimizers (two moments), else 1
    Hugging Face copy (hf/)         4 P
A LoRA run saves its adapter only (a few percent of P), plus a merged full copy with
`checkpointing.save_merged`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_rl.config.schema import MasterConfig
from nemo_rl.utils.hf_config import load_hf_config

log = logging.getLogger(__name__)

BYTES_PER_PARAM = 4  # the workers keep fp32 master weights whatever `policy.precision` is
LORA_SHARE = 0.05  # an upper bound of an adapter's size relative to the model, for the estimate


class PreflightError(RuntimeError):
    """A directory the run needs is unusable or too small; found before training starts."""


@dataclass(frozen=True)
class CheckpointEstimate:
    num_params: int
    weights_bytes: int
    optimizer_bytes: int
    hf_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes + self.hf_bytes

    def describe(self) -> str:
        return (
            f"{_gib(self.total_bytes)} for {self.num_params:,} parameters: weights {_gib(self.weights_bytes)}, "
            f"optimizer {_gib(self.optimizer_bytes)}, Hugging Face copy {_gib(self.hf_bytes)}"
        )


def preflight(cfg: MasterConfig, *, num_params: int | None = None) -> None:
    """Raises PreflightError when a directory is unwritable or short of space for a checkpoint.

    `num_params`: the model's parameter count; counted from `policy.model_name` when None
    (a model that cannot be counted skips the space check with a warning).
    """
    ckpt = cfg.checkpointing
    if ckpt.enabled:
        check_writable(Path(ckpt.checkpoint_dir), "checkpointing.checkpoint_dir")
    check_writable(Path(cfg.logger.log_dir), "logger.log_dir")
    if not ckpt.enabled:
        return
    if num_params is None:
        try:
            num_params = count_parameters(
                cfg.policy.model_name,
                trust_remote_code=cfg.policy.trust_remote_code,
                config_overrides=cfg.policy.hf_config_overrides,
            )
        except Exception as error:  # e.g. an unusual architecture; the workers will report real problems
            log.warning("preflight: could not count the parameters of %s (%s); free space not checked", cfg.policy.model_name, error)
            return
    estimate = estimate_checkpoint_bytes(
        num_params,
        save_optimizer=ckpt.save_optimizer,
        optimizer_name=_optimizer_name(cfg.policy),
        lora=cfg.policy.lora_enabled(),
        save_merged=ckpt.save_merged,
    )
    check_free_space(Path(ckpt.checkpoint_dir), estimate, "checkpointing.checkpoint_dir")


def _optimizer_name(policy) -> str:
    """The DTensor backend's optimizer class, or the Megatron backend's (`adam` / `sgd`)."""
    return policy.optimizer.name if policy.optimizer is not None else policy.megatron_cfg.optimizer.optimizer


def check_writable(path: Path, key: str) -> None:
    """Creates `path` if needed and writes and deletes a probe file in it."""
    probe = path / f".nemo_rl_write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise PreflightError(
            f"{key}={path} is not a writable directory ({reason}: {error.filename or path}); "
            f"point {key} at a directory this user can write to"
        ) from None


def check_free_space(path: Path, estimate: CheckpointEstimate, key: str) -> None:
    free = shutil.disk_usage(path).free
    if free < estimate.total_bytes:
        raise PreflightError(
            f"{key}={path} has {_gib(free)} free, but one checkpoint needs about {estimate.describe()}. "
            f"Free some space, point {key} at a larger filesystem, or save less "
            "(checkpointing.save_optimizer=false, which makes resuming inexact)."
        )


def estimate_checkpoint_bytes(
    num_params: int,
    *,
    save_optimizer: bool = True,
    optimizer_name: str = "torch.optim.AdamW",
    lora: bool = False,
    save_merged: bool = False,
) -> CheckpointEstimate:
    """The size of one `step_<N>/` directory (see the module docstring)."""
    full = num_params * BYTES_PER_PARAM
    trained = int(full * LORA_SHARE) if lora else full
    factor = 2 if "adam" in optimizer_name.lower() else 1
    hf = ((full if save_merged else 0) + trained) if lora else full
    return CheckpointEstimate(
        num_params=num_params,
        weights_bytes=trained,
        optimizer_bytes=trained * factor if save_optimizer else 0,
        hf_bytes=hf,
    )


def count_parameters(
    model_name: str, *, trust_remote_code: bool = False, config_overrides: dict[str, Any] | None = None
) -> int:
    """Parameters of `model_name` (tied weights once), from a weightless meta-device copy."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_hf_config(model_name, trust_remote_code=trust_remote_code, overrides=config_overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def _gib(num_bytes: float) -> str:
    if num_bytes < 2**30:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**30:.1f} GiB"
