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
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, SequentialLR

from nemo_rl.config.errors import closest
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
    """`cfg.name(params, **cfg.kwargs)`, with `implementation_defaults` added where the
    kwargs choose no implementation."""
    optimizer_cls = import_dotted(cfg.name, config_key="policy.optimizer.name")
    params = list(params)
    defaults = implementation_defaults(optimizer_cls, params, cfg.kwargs)
    kwargs = {**cfg.kwargs, **defaults}
    try:
        return optimizer_cls(params, **kwargs)
    except TypeError as exc:
        raise ValueError(f"policy.optimizer: {cfg.name}(**{cfg.kwargs}) failed: {exc}") from exc


# torch's Adam and AdamW have one fused kernel for all parameters of a step, on CPU and CUDA,
# DTensor shards included. Left to itself torch picks it nowhere: it picks `foreach` on CUDA
# and the per-tensor loop on CPU, which is measurably slower (docs/performance.md).
_FUSED_BY_DEFAULT = ("torch.optim.adam.Adam", "torch.optim.adamw.AdamW")
_FUSED_DEVICE_TYPES = ("cpu", "cuda")


def implementation_defaults(
    optimizer_cls: Any, params: list[torch.nn.Parameter], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """`{"fused": True}` for torch's Adam/AdamW when every parameter is a floating-point tensor
    on a CPU or CUDA device and `kwargs` sets none of `fused`, `foreach`, `differentiable`
    to a value other than None (the user's choice wins); else `{}` (torch's own default). The fused kernel computes the
    same update as the loop, to fp32 rounding (tests/unit/models/policy/test_optim_fused.py)."""
    qualified = f"{getattr(optimizer_cls, '__module__', '')}.{getattr(optimizer_cls, '__qualname__', '')}"
    chosen = {k for k, v in kwargs.items() if v is not None}  # null: torch's default, i.e. not chosen
    if qualified not in _FUSED_BY_DEFAULT or {"fused", "foreach", "differentiable"} & chosen:
        return {}
    if not params or not all(isinstance(p, torch.Tensor) for p in params):  # param groups: left alone
        return {}
    devices = {p.device.type for p in params}
    if len(devices) != 1 or not devices <= set(_FUSED_DEVICE_TYPES):
        return {}
    if not all(torch.is_floating_point(p) for p in params):
        return {}
    return {"fused": True}


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


# ---------------------------------------------------------------- checked in the driver


def check_optimizer_config(
    optimizer: OptimizerConfig, entries: list[SchedulerEntry], *, scheduler_is_list: bool = True
) -> None:
    """Imports the configured optimizer and scheduler classes and binds their kwargs to the
    constructors' signatures, so that a misspelt class or argument fails in the driver, with
    the key, before any worker starts. Raises ValueError (one line)."""
    optimizer_cls = import_dotted(optimizer.name, config_key="policy.optimizer.name")
    _bind(optimizer_cls, optimizer.kwargs, key="policy.optimizer", name=optimizer.name, first="params")
    for i, entry in enumerate(entries):
        key = f"policy.scheduler[{i}]" if scheduler_is_list else "policy.scheduler"
        scheduler_cls = import_dotted(entry.name, config_key=f"{key}.name")
        _bind(scheduler_cls, entry.kwargs, key=key, name=entry.name, first="optimizer")
    # torch's own classes check their values at construction: try them on a stand-in parameter.
    if optimizer.name.startswith("torch.optim."):
        stand_in = [torch.nn.Parameter(torch.zeros(1))]
        try:
            built = optimizer_cls(stand_in, **optimizer.kwargs)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(f"policy.optimizer: {optimizer.name}(**{optimizer.kwargs}) failed: {exc}") from None
        for i, entry in enumerate(entries):
            if entry.name.startswith("torch.optim."):
                try:
                    import_dotted(entry.name, config_key="")(built, **entry.kwargs)
                except (ValueError, TypeError) as exc:
                    key = f"policy.scheduler[{i}]" if scheduler_is_list else "policy.scheduler"
                    raise ValueError(f"{key}: {entry.name}(**{entry.kwargs}) failed: {exc}") from None


def _bind(cls: Any, kwargs: dict[str, Any], *, key: str, name: str, first: str) -> None:
    if not callable(cls):
        raise ValueError(f"{key}.name={name!r} is a {type(cls).__name__}, not a class")
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # some C-implemented classes hide their signature
        return
    accepted = [p for p in signature.parameters if p not in (first, "self")]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [k for k in kwargs if k not in signature.parameters or k == first]
    if unknown and not takes_any:
        close = closest(unknown[0], accepted)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise ValueError(
            f"{key}.kwargs.{unknown[0]}: {name} takes no argument {unknown[0]!r}{hint}; its arguments: {accepted}"
        )
    try:
        signature.bind(object(), **kwargs)
    except TypeError as exc:
        raise ValueError(f"{key}.kwargs: {name}(**{dict(kwargs)}): {exc}; its arguments: {accepted}") from None
