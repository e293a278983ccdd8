"""torch's fused Adam/AdamW kernel by default, and the same parameters as the per-tensor loop.

Compared against `foreach=False, fused=False` (torch's reference loop) on the same model and
batches: in one process on plain tensors, and on two FSDP2 ranks, where the parameters are
DTensor shards.
"""

from __future__ import annotations

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import BASE_LR, MAX_GRAD_NORM, make_batch, reference_loss, tiny_llama

from nemo_rl.config.schema import OptimizerConfig
from nemo_rl.models.policy.optim import build_optimizer

ADAMW = {"lr": BASE_LR, "weight_decay": 0.01}
PLAIN = {"foreach": False, "fused": False}
STEPS = 3


def _params():
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]


@pytest.mark.parametrize("name", ["torch.optim.AdamW", "torch.optim.Adam"])
def test_adam_and_adamw_default_to_the_fused_kernel(name):
    optimizer = build_optimizer(_params(), OptimizerConfig(name=name, kwargs={"lr": 1e-3}))
    assert optimizer.defaults["fused"] is True


def test_null_choices_leave_the_default():  # `foreach: null` in YAML: torch's default, not a choice
    optimizer = build_optimizer(_params(), OptimizerConfig(kwargs={"lr": 1e-3, "foreach": None, "fused": None}))
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("choice", [{"foreach": False}, {"foreach": True}, {"fused": False}, {"differentiable": True}])
def test_the_configured_implementation_wins(choice):
    optimizer = build_optimizer(_params(), OptimizerConfig(kwargs={"lr": 1e-3, **choice}))
    assert not optimizer.defaults["fused"]
    for key, value in choice.items():
        assert optimizer.defaults[key] == value


def test_other_optimizers_and_param_groups_are_left_to_torch():
    sgd = build_optimizer(_params(), OptimizerConfig(name="torch.optim.SGD", kwargs={"lr": 0.1}))
    assert not sgd.defaults["fused"]
    groups = [{"params": _params(), "lr": 0.1}]
    adamw = build_optimizer(groups, OptimizerConfig(kwargs={"lr": 1e-3}))
    assert not adamw.defaults["fused"]


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        batch = make_batch(step)
        reference_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _largest_relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over parameters of ||got - want|| / ||want||.

    After the first step the two runs' gradients differ by their parameters' rounding, and
    Adam divides by sqrt(v): on the few entries whose v is tiny that is amplified to a few
    ulps of the parameter. A norm sees the whole tensor, so noise on a few entries stays
    well below 1e-6, while a wrong update (a missed bias correction, weight decay, clipping)
    moves it by far more."""
    return max(float(torch.linalg.vector_norm(got[k] - want[k]) / torch.linalg.vector_norm(want[k])) for k in want)


def _trained_params(kwargs: dict, steps: int = STEPS) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    optimizer = build_optimizer(model.parameters(), OptimizerConfig(kwargs={**ADAMW, **kwargs}))
    assert optimizer.defaults["fused"] is (not kwargs)
    _train(model, optimizer, steps)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_one_fused_step_equals_the_loop_to_rounding():
    fused, plain = _trained_params({}, steps=1), _trained_params(PLAIN, steps=1)
    for k in plain:  # elementwise: a few ulps of the largest weight of each tensor
        torch.testing.assert_close(fused[k], plain[k], rtol=0, atol=4e-7 * float(plain[k].abs().max()))


def test_fused_default_matches_the_loop_in_one_process():
    fused, plain = _trained_params({}), _trained_params(PLAIN)
    assert _largest_relative_difference(fused, plain) < 1e-6
    initial = {k: v.detach() for k, v in tiny_llama().named_parameters()}
    assert _largest_relative_difference(initial, plain) > 1e-3  # the steps moved the weights


def _fsdp_trained_params(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from nemo_rl.distributed.worker_env import init_torch_distributed
    from nemo_rl.models.parallelize import apply_fsdp

    _, world_size, _ = init_torch_distributed("cpu")
    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for label, kwargs in (("default", {}), ("plain", PLAIN)):
        model = tiny_llama()
        apply_fsdp(model, mesh, param_dtype=torch.float32)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        optimizer = build_optimizer(model.parameters(), OptimizerConfig(kwargs={**ADAMW, **kwargs}))
        assert optimizer.defaults["fused"] is (label == "default")
        # Each rank its own half of every batch: the gradient reduce-scatter is part of the step.
        for step in range(STEPS):
            local = make_batch(step).shard_by_batch_size(world_size)[rank]
            (reference_loss(model, local) / world_size).backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results[label] = {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}
    torch.distributed.destroy_process_group()
    return results


@pytest.mark.slow  # two processes: seconds alone, minutes on a loaded machine
def test_fused_default_matches_the_loop_on_fsdp_shards():
    rank0, rank1 = run_ranks(2, _fsdp_trained_params)
    assert _largest_relative_difference(rank0["default"], rank0["plain"]) < 1e-6
    assert _largest_relative_difference(rank1["default"], rank0["default"]) == 0.0
