"""Optimizer and learning-rate scheduler from the `policy.optimizer` / `policy.scheduler` config.

The scheduler follows NeMo RL's list form:

    scheduler:
      - name: torch.optim.lr_scheduler.LinearLR        # warm-up
        kwargs: {start_factor: 0.1, end_factor: 1.0, total_iters: 50}
      - name: torch.optim.lr_scheduler.CosineAnnealingLR
        kwargs: {T_max: 950, eta_min: 1.0e-6}
      - milestones: [50]

which becomes `SequentialLR(optimizer, [LinearLR, CosineAnnealingLR], milestones=[50])`.
One entry is used as is; no scheduler means a constant learning rate. The scheduler is
stepped once per optimizer step.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, SequentialLR

from nemo_rl.config.schema import OptimizerConfig, SchedulerEntry


def import_dotted(name: str, *, config_key: str) -> Any:
    """`"torch.optim.AdamW"` -> the class; errors name the config key that holds `name`."""
    module_name, _, attr = name.rpartition(".")
    if not module_name:
        raise ValueError(f"{config_key}={name!r} is not a dotted path like 'torch.optim.AdamW'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{config_key}={name!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{config_key}={name!r}: module {module_name!r} has no attribute {attr!r}") from None


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    optimizer_cls = import_dotted(cfg.name, config_key="policy.optimizer.name")
    try:
        return optimizer_cls(params, **cfg.kwargs)
    except TypeError as exc:
        raise ValueError(f"policy.optimizer: {cfg.name}(**{cfg.kwargs}) failed: {exc}") from exc


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    entries: list[SchedulerEntry],
    milestones: list[int],
) -> LRScheduler:
    """`entries, milestones` as returned by `PolicyConfig.scheduler_entries()`."""
    if not entries:
        return LambdaLR(optimizer, lambda _step: 1.0)
    schedulers = []
    for i, entry in enumerate(entries):
        key = f"policy.scheduler[{i}]"
        scheduler_cls = import_dotted(entry.name, config_key=f"{key}.name")
        try:
            schedulers.append(scheduler_cls(optimizer, **entry.kwargs))
        except TypeError as exc:
            raise ValueError(f"{key}: {entry.name}(**{entry.kwargs}) failed: {exc}") from exc
    if len(schedulers) == 1:
        return schedulers[0]
    return SequentialLR(optimizer, schedulers, milestones=milestones)
