"""LoRA in DTensorPolicyWorker on a tiny Llama, run directly (no Ray) in 1 and 2 gloo processes.

  world 1: step-0 logits; 3 steps (micro-batch 8); PEFT adapter + merged export; final logits.
  world 2: A. the same 3 steps (micro-batch 2), sharded by FSDP2 over 2 ranks; PEFT adapter;
           B. a worker resumed from A's step-2 DCP checkpoint (adapter + optimizer) repeats step 3;
           C. bfloat16 compute: one step.

LoRA targets every linear layer but layer 1's MLP (exclude_modules), so both the short-name and
the full-name forms of adapter_config.json's target_modules are exercised.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import make_batch, policy_config, save_tiny_llama
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

# Slow: three-step LoRA runs of four workers in 1 and 2 processes; the fast tier keeps LoRA on a
# model in one process (test_lora.py).
pytestmark = pytest.mark.slow

NUM_STEPS = 3
DIM, ALPHA = 4, 8
LORA = {"enabled": True, "exclude_modules": ["*.layers.1.mlp.*"], "dim": DIM, "alpha": ALPHA, "dropout": 0.0}
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _config(model_dir, **overrides):
    return policy_config(model_dir, dtensor_cfg={"lora_cfg": LORA}, **overrides)


def _batches():
    return [make_batch(seed) for seed in range(NUM_STEPS)]


def _train(worker, batches, rank, world_size, micro_batch_size):
    local = [b.shard_by_batch_size(world_size)[rank] for b in batches]
    return [worker.train(b, NLLLoss(), MicroBatchPlan(micro_batch_size)) for b in local]


def _full_state(worker) -> dict[str, torch.Tensor]:
    # cloned: on one rank the gathered tensors may share storage with the live parameters
    return {k: v.clone() for k, v in get_model_state_dict(worker.model, options=FULL).items()}


def _optimizer_numel(worker) -> int:
    return sum(p.numel() for group in worker.optimizer.param_groups for p in group["params"])


def _world1(rank, model_dir, out):
    batches = _batches()
    worker = DTensorPolicyWorker(_config(model_dir), seed=1, device="cpu")
    results = {
        "counts": worker.get_parameter_counts(),
        "optimizer_numel": _optimizer_numel(worker),
        "logits_step0": worker.get_logits(batches[0]),
        "state_step0": _full_state(worker),
    }
    results["history"] = _train(worker, batches, rank, 1, micro_batch_size=8)
    results["state_final"] = _full_state(worker)
    results["logits_final"] = worker.get_logits(batches[0])
    worker.save_checkpoint(
        weights_path=os.path.join(out, "w1_weights"),
        hf_path=os.path.join(out, "w1_hf"),
        hf_merged_path=os.path.join(out, "w1_hf_merged"),
    )
    worker.shutdown()
    return results


def _world2(rank, model_dir, out):
    batches = _batches()
    cfg = _config(model_dir)
    results = {}
    ckpt = dict(weights_path=os.path.join(out, "w2_step2_weights"), optimizer_path=os.path.join(out, "w2_step2_optim"))

    worker = DTensorPolicyWorker(cfg, seed=1, device="cpu")
    results["optimizer_numel"] = _optimizer_numel(worker)
    results["history"] = _train(worker, batches[:2], rank, 2, micro_batch_size=2)
    worker.save_checkpoint(**ckpt)
    results["history"] += _train(worker, batches[2:], rank, 2, micro_batch_size=2)
    worker.save_checkpoint(weights_path=None, hf_path=os.path.join(out, "w2_hf"))  # the adapter only
    del worker

    worker = DTensorPolicyWorker(cfg, seed=1, device="cpu", **ckpt)
    results["resumed"] = _train(worker, batches[2:], rank, 2, micro_batch_size=2)
    del worker

    worker = DTensorPolicyWorker(_config(model_dir, precision="bfloat16"), seed=1, device="cpu")
    results["bf16"] = _train(worker, batches[:1], rank, 2, micro_batch_size=4)
    worker.shutdown()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_worker")
    model_dir = save_tiny_llama(str(root / "tiny_llama"))
    (w1,) = run_ranks(1, _world1, model_dir, str(root))
    w2, _ = run_ranks(2, _world2, model_dir, str(root))
    return {"root": root, "model_dir": model_dir, "w1": w1, "w2": w2}


def _base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _targets() -> list[str]:
    attn = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return attn + [f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]


def test_step0_logits_equal_the_base_model(runs):
    with torch.no_grad():
        want = _base(runs["model_dir"])(input_ids=make_batch(0)["input_ids"]).logits
    torch.testing.assert_close(runs["w1"]["logits_step0"], want, rtol=1e-6, atol=1e-6)


def test_trainable_count_is_the_analytic_count_and_the_optimizer_holds_only_adapters(runs):
    base = _base(runs["model_dir"])
    modules = dict(base.named_modules())
    expected = sum(DIM * (modules[t].in_features + modules[t].out_features) for t in _targets())
    total = sum(p.numel() for p in base.parameters())
    assert runs["w1"]["counts"] == {"trainable": expected, "total": total + expected, "lora_modules": len(_targets())}
    assert runs["w1"]["optimizer_numel"] == runs["w2"]["optimizer_numel"] == expected


def test_base_weights_are_bit_identical_after_training_and_adapters_moved(runs):
    before, after = runs["w1"]["state_step0"], runs["w1"]["state_final"]
    base_state = _base(runs["model_dir"]).state_dict()
    lora_keys = {k for k in after if ".lora_" in k}
    assert lora_keys == {f"{t}.lora_{ab}.weight" for t in _targets() for ab in "AB"}
    for key, value in base_state.items():
        assert torch.equal(after[key], value), key
    for key in lora_keys:
        assert not torch.equal(after[key], before[key]), f"{key} did not train"
        if ".lora_B." in key:
            assert torch.count_nonzero(before[key]) == 0


def test_one_and_two_workers_give_the_same_losses(runs):
    one, two = runs["w1"]["history"], runs["w2"]["history"]
    assert len(one) == len(two) == NUM_STEPS
    for step, (a, b) in enumerate(zip(one, two)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {step + 1} loss"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), f"step {step + 1} grad_norm"


def test_checkpoint_holds_the_adapter_only_and_resumes_exactly(runs):
    root = runs["root"]
    for weights in ("w1_weights", "w2_step2_weights"):
        keys = set(FileSystemReader(str(root / weights)).read_metadata().state_dict_metadata)
        assert keys == {f"{t}.lora_{ab}.weight" for t in _targets() for ab in "AB"}, weights
    (resumed,) = runs["w2"]["resumed"]
    original = runs["w2"]["history"][2]
    assert (resumed["loss"], resumed["grad_norm"], resumed["lr"]) == (original["loss"], original["grad_norm"], original["lr"])


@pytest.mark.parametrize("name", ["w1_hf", "w2_hf"])
def test_peft_adapter_dir_loads_with_peft_and_gives_the_trained_logits(runs, name):
    hf = runs["root"] / name
    assert sorted(os.listdir(hf)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((hf / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == runs["model_dir"]
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", DIM, ALPHA)
    model = PeftModel.from_pretrained(_base(runs["model_dir"]), hf).eval()
    with torch.no_grad():
        logits = model(input_ids=make_batch(0)["input_ids"]).logits
    torch.testing.assert_close(logits, runs["w1"]["logits_final"], rtol=1e-5, atol=1e-5)


def test_merged_export_loads_as_a_plain_model_with_the_trained_logits(runs):
    model = _base(runs["root"] / "w1_hf_merged")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        logits = model(input_ids=make_batch(0)["input_ids"]).logits
    torch.testing.assert_close(logits, runs["w1"]["logits_final"], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_trains_close_to_float32(runs):
    (got,) = runs["w2"]["bf16"]
    want = runs["w1"]["history"][0]
    assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-2)
