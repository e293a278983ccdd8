"""DTensorPolicyWorker on a tiny Llama, run directly (no Ray) in 1 and 2 gloo processes.

One scenario per world size, each a few workers built in turn in the same processes:

  world 1: micro-batch = whole batch (8), 3 steps, hf/ export.
  world 2: A. micro-batch = whole local batch (4), 3 steps, hf/ export;
           B. micro-batch 1: 2 steps, DCP checkpoint, step 3, hf/ export, logits;
           C. a fresh worker resumed from B's DCP checkpoint runs step 3 again;
           D. bfloat16 compute, activation checkpointing and CPU offload: one step.

Every run is checked against a plain single-process PyTorch training of the same model on
the same batches (`policy_test_utils.reference_training`), so the invariances
(world size, micro-batch size) follow from each run equalling the reference.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import (
    EXPECTED_LRS,
    make_batch,
    policy_config,
    reference_loss,
    reference_training,
    save_tiny_llama,
)
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

# Slow: four workers' training runs in 1 and 2 processes; test_untied_head.py keeps a 2-rank
# FSDP2 step in the fast tier (`pytest -m "not slow"`).
pytestmark = pytest.mark.slow

NUM_STEPS = 3


def _batches():
    return [make_batch(seed) for seed in range(NUM_STEPS)]


def _local(batch, rank, world_size):
    return batch.shard_by_batch_size(world_size)[rank]


def _train(worker, batches, rank, world_size, micro_batch_size):
    return [worker.train(_local(b, rank, world_size), NLLLoss(), MicroBatchPlan(micro_batch_size)) for b in batches]


def _world1(rank, model_dir, out_dir):
    batches = _batches()
    worker = DTensorPolicyWorker(policy_config(model_dir), seed=1, device="cpu")
    results = {"mb8": _train(worker, batches, rank, 1, micro_batch_size=8)}
    worker.save_checkpoint(weights_path=None, hf_path=os.path.join(out_dir, "w1_mb8_hf"))
    worker.shutdown()
    return results


def _world2(rank, model_dir, out_dir):
    batches = _batches()
    cfg = policy_config(model_dir)
    results = {}

    worker = DTensorPolicyWorker(cfg, seed=1, device="cpu")
    results["mb4"] = _train(worker, batches, rank, 2, micro_batch_size=4)
    worker.save_checkpoint(weights_path=None, hf_path=os.path.join(out_dir, "w2_mb4_hf"))
    del worker

    worker = DTensorPolicyWorker(cfg, seed=1, device="cpu")
    results["mb1"] = _train(worker, batches[:2], rank, 2, micro_batch_size=1)
    ckpt = dict(
        weights_path=os.path.join(out_dir, "step2_weights"),
        optimizer_path=os.path.join(out_dir, "step2_optim"),
    )
    worker.save_checkpoint(**ckpt)
    results["mb1"] += _train(worker, batches[2:], rank, 2, micro_batch_size=1)
    worker.save_checkpoint(weights_path=None, hf_path=os.path.join(out_dir, "w2_mb1_hf"))
    results["mb1_logits"] = worker.get_logits(batches[0])  # the whole batch on every rank
    results["mb1_validate"] = worker.validate(_local(batches[0], rank, 2), NLLLoss(), MicroBatchPlan(3))
    del worker

    worker = DTensorPolicyWorker(cfg, seed=1, device="cpu", **ckpt)
    results["resumed"] = _train(worker, batches[2:], rank, 2, micro_batch_size=1)
    del worker

    low_precision = policy_config(
        model_dir, precision="bfloat16", dtensor_cfg={"activation_checkpointing": True, "cpu_offload": True}
    )
    worker = DTensorPolicyWorker(low_precision, seed=1, device="cpu")
    results["bf16_ac_offload"] = _train(worker, batches[:1], rank, 2, micro_batch_size=2)
    worker.shutdown()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtensor_worker")
    model_dir = save_tiny_llama(str(root / "tiny_llama"))
    (w1,) = run_ranks(1, _world1, model_dir, str(root))
    w2, _ = run_ranks(2, _world2, model_dir, str(root))
    history, reference_model = reference_training(model_dir, _batches())
    return {
        "root": root,
        "model_dir": model_dir,
        "runs": {"w1_mb8": w1["mb8"], "w2_mb4": w2["mb4"], "w2_mb1": w2["mb1"]},
        "w2": w2,
        "reference": history,
        "reference_model": reference_model,
    }


def test_first_step_loss_equals_plain_pytorch(runs):
    model = AutoModelForCausalLM.from_pretrained(runs["model_dir"], dtype=torch.float32)
    with torch.no_grad():
        expected = reference_loss(model, make_batch(0)).item()
    for name, history in runs["runs"].items():
        assert history[0]["loss"] == pytest.approx(expected, rel=1e-5), name


@pytest.mark.parametrize("name", ["w1_mb8", "w2_mb4", "w2_mb1"])
def test_losses_and_updates_match_single_process_reference(runs, name):
    for step, (got, want) in enumerate(zip(runs["runs"][name], runs["reference"], strict=True)):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"step {step + 1} loss"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), f"step {step + 1} grad_norm"
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12), f"step {step + 1} lr"
    assert [r["lr"] for r in runs["runs"][name]] == pytest.approx(EXPECTED_LRS)

    trained = AutoModelForCausalLM.from_pretrained(runs["root"] / f"{name}_hf", dtype=torch.float32)
    want_state = runs["reference_model"].state_dict()
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(value, want_state[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_metrics_count_global_tokens_and_samples(runs):
    batch = make_batch(0)
    want_tokens = int((batch["token_mask"][:, 1:] * batch["sample_mask"][:, None]).sum())
    first = runs["w2"]["mb1"][0]
    assert first["num_valid_tokens"] == want_tokens
    assert first["num_valid_samples"] == int((batch["sample_mask"] > 0).sum()) == 7
    local = batch.shard_by_batch_size(2)[0]
    want_local = int((local["token_mask"][:, 1:] * local["sample_mask"][:, None]).sum())
    assert first["local_valid_tokens"] == want_local
    assert first["peak_memory_gb"] > 0


def test_validate_returns_this_ranks_nll_sum(runs):
    trained = AutoModelForCausalLM.from_pretrained(runs["root"] / "w2_mb1_hf", dtype=torch.float32)
    local = make_batch(0).shard_by_batch_size(2)[0]
    with torch.no_grad():
        mean = reference_loss(trained, local).item()
    tokens = (local["token_mask"][:, 1:] * local["sample_mask"][:, None]).sum().item()
    got = runs["w2"]["mb1_validate"]
    assert got["num_valid_tokens"] == tokens
    assert got["loss_sum"] == pytest.approx(mean * tokens, rel=1e-5)


def test_hf_export_loads_with_tied_embeddings_and_same_logits(runs):
    hf_dir = runs["root"] / "w2_mb1_hf"
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(hf_dir))
    with safe_open(hf_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # stored once
    assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(input_ids=make_batch(0)["input_ids"]).logits
    torch.testing.assert_close(logits, runs["w2"]["mb1_logits"], rtol=1e-5, atol=1e-5)


def test_resume_from_dcp_checkpoint_repeats_the_next_step(runs):
    (resumed,) = runs["w2"]["resumed"]
    original = runs["w2"]["mb1"][2]
    assert resumed["lr"] == original["lr"] == EXPECTED_LRS[2]  # scheduler restored
    assert resumed["loss"] == original["loss"]  # bit-identical at the same world size
    assert resumed["grad_norm"] == original["grad_norm"]


def test_bf16_activation_checkpointing_and_cpu_offload_train(runs):
    (got,) = runs["w2"]["bf16_ac_offload"]
    want = runs["reference"][0]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-2)
