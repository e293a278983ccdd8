"""Each parallel layout trains exactly like one process: per-step losses, gradient norms and
the final weights of a short fp32 run equal the single-process reference (rel 1e-5).

A layout is a world size and `policy.dtensor_cfg` keys; every rank builds the one device mesh
(dp_replicate, dp_shard, cp, tp) and gets its data-parallel rank's shard of each global batch.
"""

from __future__ import annotations


import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import (
    make_batch,
    policy_config,
    reference_loss,
    reference_training,
    save_tiny_llama,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.data.targets import count_valid_tokens
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
    # the recomputed forward gathers keys and values again, with the layout it was given
    "cp2_checkpointing": (2, {"context_parallel_size": 2, "activation_checkpointing": True}),
    "cp2_tp2_sp": (4, {"context_parallel_size": 2, "tensor_parallel_size": 2, "sequence_parallel": True}),
}


def _train(rank, model_dir, dtensor_cfg, out_path, policy_overrides=None):
    cfg = policy_config(model_dir, dtensor_cfg=dtensor_cfg, **(policy_overrides or {}))
    worker = DTensorPolicyWorker(cfg, seed=1, device="cpu")
    plan = MicroBatchPlan.for_training(cfg) if cfg.sequence_packing.enabled else MicroBatchPlan(2)
    steps = []
    for step in range(STEPS):
        local = make_batch(step).shard_by_batch_size(worker.dp_size)[worker.dp_rank]
        steps.append(worker.train(local, NLLLoss(), plan))
    validation = None
    if cfg.dtensor_cfg.context_parallel_size > 1:  # its validation sums over the cp ranks itself
        local = make_batch(STEPS).shard_by_batch_size(worker.dp_size)[worker.dp_rank]
        result = worker.validate(local, NLLLoss(), MicroBatchPlan(2))
        validation = torch.tensor([result["loss_sum"], result["num_valid_tokens"]], dtype=torch.float64)
        torch.distributed.all_reduce(validation, group=worker.dp_group)
    weights = get_model_state_dict(worker.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    layer = worker.model.model.layers[0]
    mesh_dims = {  # Llama's names (Phi-3 fuses these projections); a lone fp32 rank has no mesh
        name: getattr(getattr(module.weight, "device_mesh", None), "mesh_dim_names", ())
        for name, module in layer.named_modules()
        if name in ("self_attn.q_proj", "mlp.gate_proj")
    }
    if rank == 0:
        torch.save({"steps": steps, "weights": weights, "mesh_dims": mesh_dims, "validation": validation}, out_path)
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
    if got.get("validation") is not None:  # validation with the final weights, on a batch not trained on
        batch = make_batch(STEPS)
        with torch.no_grad():
            want_loss = reference_loss(reference_model, batch).item()
        loss_sum, num_valid_tokens = got["validation"].tolist()
        assert num_valid_tokens == count_valid_tokens(batch).item()
        assert loss_sum / num_valid_tokens == pytest.approx(want_loss, rel=1e-5)


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


# Two or three samples per packed row of 32 tokens: rows whose samples straddle the cp chunks.
PACKING = {"sequence_packing": {"enabled": True, "train_mb_tokens": 32, "sequence_length_round": 1}}


@pytest.mark.slow
def test_context_parallel_with_packing_equals_the_single_process_reference(reference, tmp_path):
    """Packed samples split over 2 cp ranks still see only themselves (the reference runs each
    sample in its own padded row)."""
    model_dir, history, model = reference
    run_ranks(2, _train, model_dir, {"context_parallel_size": 2}, str(tmp_path / "cp.pt"), PACKING)
    _compare(torch.load(tmp_path / "cp.pt"), history, model)


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
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_lora_under_tensor_parallelism_equals_one_process(reference, sequence_parallel, tmp_path):
    """Every linear of the blocks adapted, column- and row-parallel; the reference is the same
    LoRA run in one process (its adapter init is seeded, hence the same on every rank). With
    sequence parallelism the frozen norms (sequence-sharded) must stay frozen."""
    model_dir, _, _ = reference
    run_ranks(1, _train, model_dir, {"lora_cfg": LORA}, str(tmp_path / "one.pt"))
    layout = {"tensor_parallel_size": 2, "sequence_parallel": sequence_parallel, "lora_cfg": LORA}
    run_ranks(2, _train, model_dir, layout, str(tmp_path / "tp.pt"))
    got, want = torch.load(tmp_path / "tp.pt"), torch.load(tmp_path / "one.pt")
    assert any("lora_B" in name for name in want["weights"])
    assert [s["loss"] for s in got["steps"]] == pytest.approx([s["loss"] for s in want["steps"]], rel=1e-5)
    assert [s["grad_norm"] for s in got["steps"]] == pytest.approx([s["grad_norm"] for s in want["steps"]], rel=1e-5)
    assert set(got["weights"]) == set(want["weights"])
    for name, tensor in want["weights"].items():
        error = (got["weights"][name] - tensor).norm() / tensor.norm().clamp(min=1e-12)
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.slow
def test_lora_under_context_parallelism_equals_one_process(reference, tmp_path):
    """The adapters do not touch attention or the token layout: the same LoRA run in one process."""
    model_dir, _, _ = reference
    run_ranks(1, _train, model_dir, {"lora_cfg": LORA}, str(tmp_path / "one.pt"))
    run_ranks(2, _train, model_dir, {"context_parallel_size": 2, "lora_cfg": LORA}, str(tmp_path / "cp.pt"))
    got, want = torch.load(tmp_path / "cp.pt"), torch.load(tmp_path / "one.pt")
    assert [s["loss"] for s in got["steps"]] == pytest.approx([s["loss"] for s in want["steps"]], rel=1e-5)
    assert [s["grad_norm"] for s in got["steps"]] == pytest.approx([s["grad_norm"] for s in want["steps"]], rel=1e-5)
    for name, tensor in want["weights"].items():
        error = (got["weights"][name] - tensor).norm() / tensor.norm().clamp(min=1e-12)
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
