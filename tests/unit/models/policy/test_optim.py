"""Optimizer and scheduler built from the policy config (NeMo RL's list form)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from nemo_rl.config.schema import OptimizerConfig, PolicyConfig
from nemo_rl.models.policy.optim import build_optimizer, build_scheduler


def _policy(scheduler) -> PolicyConfig:
    return PolicyConfig(
        model_name="unused",
        tokenizer={"name": "unused"},
        train_global_batch_size=2,
        train_micro_batch_size=1,
        max_total_sequence_length=8,
        scheduler=scheduler,
    )


def _lrs(scheduler_cfg, steps: int, lr: float = 1.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, *_policy(scheduler_cfg).scheduler_entries())
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_no_scheduler_is_constant():
    assert _lrs(None, 4, lr=0.3) == [0.3] * 4


def test_warmup_then_cosine_with_milestones():
    cfg = [
        {
            "name": "torch.optim.lr_scheduler.LinearLR",
            "kwargs": {"start_factor": 0.25, "end_factor": 1.0, "total_iters": 3},
        },
        {"name": "torch.optim.lr_scheduler.CosineAnnealingLR", "kwargs": {"T_max": 4, "eta_min": 0.0}},
        {"milestones": [3]},
    ]
    warmup = [0.25, 0.5, 0.75]
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert _lrs(cfg, 8) == pytest.approx(warmup + cosine)


def test_single_entry_without_milestones():
    cfg = {
        "name": "torch.optim.lr_scheduler.LinearLR",
        "kwargs": {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 4},
    }
    assert _lrs(cfg, 5) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_optimizer_from_dotted_name_with_kwargs():
    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = OptimizerConfig(name="torch.optim.AdamW", kwargs={"lr": 3e-4, "betas": [0.9, 0.95]})
    optimizer = build_optimizer(params, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 3e-4
    assert tuple(optimizer.param_groups[0]["betas"]) == (0.9, 0.95)


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "torch.optim.AdamWW",
            "policy.optimizer.name='torch.optim.AdamWW': module 'torch.optim' has no attribute 'AdamWW'",
        ),
        (
            "no_such_pkg.Adam",
            "policy.optimizer.name='no_such_pkg.Adam': cannot import module 'no_such_pkg'",
        ),
        ("AdamW", "policy.optimizer.name='AdamW' is not a dotted path"),
    ],
)
def test_bad_optimizer_name_names_the_config_key(name, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimizerConfig(name=name))


def test_bad_optimizer_kwargs_name_the_config_key():
    message = "policy.optimizer: torch.optim.AdamW(**{'lrr': 1}) failed"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimizerConfig(kwargs={"lrr": 1}))


def test_bad_scheduler_name_names_its_entry():
    cfg = [
        {"name": "torch.optim.lr_scheduler.LinearLR", "kwargs": {}},
        {"name": "torch.optim.lr_scheduler.Cosine", "kwargs": {}},
        {"milestones": [1]},
    ]
    message = "policy.scheduler[1].name='torch.optim.lr_scheduler.Cosine'"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        _lrs(cfg, 1)
