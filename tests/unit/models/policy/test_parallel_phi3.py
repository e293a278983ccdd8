"""Phi-3 under tensor parallelism: its fused projections (qkv_proj, gate_up_proj) have their
weight rows split and their outputs gathered whole, so the stored weights keep the checkpoint's
order. A TP 2 run trains like one process and its `hf/` export, written from the shards, loads
with `from_pretrained` and holds the reference's weights; TP 2 + SP with LoRA on every fused and
row-parallel projection trains like the same LoRA run in one process. (TP 2 and TP 2 + SP of the
tied model: test_parallel_families.py.)"""

from __future__ import annotations

import os

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import make_batch, policy_config, reference_training
from tests.unit.models.policy.test_parallel_families import SHAPE, save_tiny
from tests.unit.models.policy.test_parallel_layouts import LORA, STEPS, _train
from transformers import AutoModelForCausalLM, Phi3Config

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    config = Phi3Config(tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, **SHAPE)
    return save_tiny(config, str(tmp_path_factory.mktemp("phi3") / "model"))


def _train_and_export(rank, model_dir, out_dir):
    worker = DTensorPolicyWorker(policy_config(model_dir, dtensor_cfg={"tensor_parallel_size": 2}), seed=1, device="cpu")
    steps = [
        worker.train(make_batch(step).shard_by_batch_size(worker.dp_size)[worker.dp_rank], NLLLoss(), MicroBatchPlan(2))
        for step in range(STEPS)
    ]
    worker.save_checkpoint(weights_path=None, hf_path=os.path.join(out_dir, "hf"))
    if rank == 0:
        torch.save(steps, os.path.join(out_dir, "steps.pt"))
    worker.shutdown()


@pytest.mark.slow
def test_phi3_tp2_trains_like_one_process_and_its_hf_export_loads(phi3_dir, tmp_path):
    run_ranks(2, _train_and_export, phi3_dir, str(tmp_path))
    history, reference = reference_training(phi3_dir, [make_batch(step) for step in range(STEPS)])
    steps = torch.load(tmp_path / "steps.pt")
    assert [s["loss"] for s in steps] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    assert [s["grad_norm"] for s in steps] == pytest.approx([h["grad_norm"] for h in history], rel=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    want = reference.state_dict()
    assert set(exported.state_dict()) == set(want)
    for name, tensor in exported.state_dict().items():
        assert tensor.shape == want[name].shape, name  # the fused weights whole, in their own order
        error = (tensor - want[name]).norm() / want[name].norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.slow
def test_phi3_lora_under_tp2_with_sequence_parallelism_equals_one_process(phi3_dir, tmp_path):
    """LoRA's default targets (`*_proj`): qkv_proj and gate_up_proj (column-parallel, outputs
    gathered), o_proj and down_proj (row-parallel, taking the whole input)."""
    run_ranks(1, _train, phi3_dir, {"lora_cfg": LORA}, str(tmp_path / "one.pt"))
    layout = {"tensor_parallel_size": 2, "sequence_parallel": True, "lora_cfg": LORA}
    run_ranks(2, _train, phi3_dir, layout, str(tmp_path / "tp.pt"))
    got, want = torch.load(tmp_path / "tp.pt"), torch.load(tmp_path / "one.pt")
    assert {name.rsplit(".", 3)[-3] for name in want["weights"] if "lora_B" in name} == {
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"
    }
    assert [s["loss"] for s in got["steps"]] == pytest.approx([s["loss"] for s in want["steps"]], rel=1e-5)
    assert [s["grad_norm"] for s in got["steps"]] == pytest.approx([s["grad_norm"] for s in want["steps"]], rel=1e-5)
    assert set(got["weights"]) == set(want["weights"])
    # Per element, absolute: a few adapter elements whose gradient nearly cancels over the tokens
    # end up to ~2e-5 apart (Adam's first two steps turn summation-order noise in such a gradient
    # into a visible share of a step), 2.8e-5 relative to one adapter's small norm; the others
    # agree to ~1e-7. One Adam step here is ~5e-3 per element, so a wrong reduction or a missing
    # gradient would miss by a whole step, 100 times the 5e-5 allowed.
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=0, atol=5e-5, msg=lambda m, name=name: f"{name}: {m}")
