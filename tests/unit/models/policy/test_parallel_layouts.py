"""Each parallel layout trains exactly like one process: per-step losses, gradient norms and
the final weights of a short fp32 run equal the single-process reference (rel 1e-5).

A layout is a world size and `policy.dtensor_cfg` keys; every rank builds the one device mesh
(dp_replicate, dp_shard, cp, tp) and gets its data-parallel rank's shard of each global batch.
"""

from __future__ import annotations


import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import make_batch, policy_config, reference_training, save_tiny_llama
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

STEPS = 2
LAYOUTS = {
    "dp2": (2, {}),
    "tp2": (2, {"tensor_parallel_size": 2}),
    "tp2_sp": (2, {"tensor_parallel_size": 2, "sequence_parallel": True}),
    "dp2_tp2": (4, {"tensor_parallel_size": 2, "sequence_parallel": True}),
    "hsdp2x2": (4, {"dp_replicate_size": 2}),
    "cp2": (2, {"context_parallel_size": 2}),
    "dp2_cp2": (4, {"context_parallel_size": 2}),
    "cp2_tp2_sp": (4, {"context_parallel_size": 2, "tensor_parallel_size": 2, "sequence_parallel": True}),
}


def _train(rank, model_dir, dtensor_cfg, out_path):
    worker = DTensorPolicyWorker(policy_config(model_dir, dtensor_cfg=dtensor_cfg), seed=1, device="cpu")
    steps = []
    for step in range(STEPS):
        local = make_batch(step).shard_by_batch_size(worker.dp_size)[worker.dp_rank]
        steps.append(worker.train(local, NLLLoss(), MicroBatchPlan(2)))
    weights = get_model_state_dict(worker.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    layer = worker.model.model.layers[0]
    mesh_dims = {name: layer.get_submodule(name).weight.device_mesh.mesh_dim_names for name in ("self_attn.q_proj", "mlp.gate_proj")}
    if rank == 0:
        torch.save({"steps": steps, "weights": weights, "mesh_dims": mesh_dims}, out_path)
    worker.shutdown()


def _compare(got, reference_history, reference_model):
    assert [s["loss"] for s in got["steps"]] == pytest.approx([h["loss"] for h in reference_history], rel=1e-5)
    assert [s["grad_norm"] for s in got["steps"]] == pytest.approx([h["grad_norm"] for h in reference_history], rel=1e-5)
    want = reference_model.state_dict()
    assert set(got["weights"]) == set(want)
    for name, tensor in want.items():
        # Relative to the tensor's norm: Adam's first steps divide by tiny second moments, so
        # a single near-zero element may differ by a few 1e-6 in absolute terms.
        error = (got["weights"][name] - tensor).norm() / tensor.norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def reference(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    model_dir = save_tiny_llama(str(root / "model"), tie_word_embeddings=request.param)
    history, model = reference_training(model_dir, [make_batch(step) for step in range(STEPS)])
    return model_dir, history, model


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_the_single_process_reference(layout, reference, tmp_path):
    model_dir, history, model = reference
    world_size, dtensor_cfg = LAYOUTS[layout]
    out_path = str(tmp_path / "result.pt")
    run_ranks(world_size, _train, model_dir, dtensor_cfg, out_path)
    _compare(torch.load(out_path), history, model)


def mlp_only_plan(model, sequence_parallel):
    """A custom plan (policy.dtensor_cfg.custom_parallel_plan): only the MLPs tensor-parallel."""
    assert not sequence_parallel
    return {
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
    }


@pytest.mark.slow
def test_custom_parallel_plan_is_honoured(reference, tmp_path):
    model_dir, history, model = reference
    layout = {"tensor_parallel_size": 2, "custom_parallel_plan": f"{__name__}.mlp_only_plan"}
    run_ranks(2, _train, model_dir, layout, str(tmp_path / "custom.pt"))
    got = torch.load(tmp_path / "custom.pt")
    assert "tp" in got["mesh_dims"]["mlp.gate_proj"] and "tp" not in got["mesh_dims"]["self_attn.q_proj"]
    _compare(got, history, model)


LORA = {"enabled": True, "dim": 4, "alpha": 8}


@pytest.mark.slow
def test_lora_under_tensor_parallelism_equals_one_process(reference, tmp_path):
    """Every linear of the blocks adapted, column- and row-parallel; the reference is the same
    LoRA run in one process (its adapter init is seeded, hence the same on every rank)."""
    model_dir, _, _ = reference
    run_ranks(1, _train, model_dir, {"lora_cfg": LORA}, str(tmp_path / "one.pt"))
    layout = {"tensor_parallel_size": 2, "lora_cfg": LORA}
    run_ranks(2, _train, model_dir, layout, str(tmp_path / "tp.pt"))
    got, want = torch.load(tmp_path / "tp.pt"), torch.load(tmp_path / "one.pt")
    assert any("lora_B" in name for name in want["weights"])
    assert [s["loss"] for s in got["steps"]] == pytest.approx([s["loss"] for s in want["steps"]], rel=1e-5)
    assert [s["grad_norm"] for s in got["steps"]] == pytest.approx([s["grad_norm"] for s in want["steps"]], rel=1e-5)
    assert set(got["weights"]) == set(want["weights"])
    for name, tensor in want["weights"].items():
        error = (got["weights"][name] - tensor).norm() / tensor.norm().clamp(min=1e-12)
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
