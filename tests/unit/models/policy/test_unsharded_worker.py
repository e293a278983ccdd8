"""A lone fp32 rank trains the plain module (`parallelize.fsdp_is_needed`): its steps,
validation, generation and exports equal those of FSDP2 on that one rank, and its DCP
checkpoints resume under FSDP on two ranks and the other way round."""

from __future__ import annotations

import os

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import (
    make_batch,
    policy_config,
    resume_and_step,
    save_tiny_llama,
    train_step,
)
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.parallelize import fsdp_is_needed
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers import dtensor_policy_worker
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

NUM_STEPS = 3
# Activation checkpointing rides along: it wraps the layers whether or not FSDP does.
FEATURES = {"activation_checkpointing": True}


def _one_rank_run(rank, model_dir, out_dir, force_fsdp):
    """Three steps, validation, greedy generation and an hf/ export on one rank."""
    if force_fsdp:  # FSDP2 on the one rank, as every world size had before
        dtensor_policy_worker.fsdp_is_needed = lambda *args, **kwargs: True
    worker = DTensorPolicyWorker(policy_config(model_dir, dtensor_cfg=FEATURES), seed=1, device="cpu")
    sharded = [isinstance(p, DTensor) for p in worker.model.parameters()]
    steps = [train_step(worker, step) for step in range(NUM_STEPS)]
    validation = worker.validate(make_batch(7), NLLLoss(), MicroBatchPlan(3))
    generated = worker.generate_greedy(make_batch(8).slice(0, 2), max_new_tokens=4)
    hf_path = os.path.join(out_dir, "hf")
    worker.save_checkpoint(weights_path=None, hf_path=hf_path)
    worker.shutdown()
    return {"sharded": sharded, "steps": steps, "validation": validation, "generated": generated, "hf_path": hf_path}


@pytest.mark.slow
def test_plain_module_equals_fsdp_on_one_rank(tmp_path):
    model_dir = save_tiny_llama(str(tmp_path / "model"))
    (plain,) = run_ranks(1, _one_rank_run, model_dir, str(tmp_path / "plain"), False)
    (fsdp,) = run_ranks(1, _one_rank_run, model_dir, str(tmp_path / "fsdp"), True)
    assert not any(plain["sharded"]) and all(fsdp["sharded"])
    for step, (got, want) in enumerate(zip(plain["steps"], fsdp["steps"], strict=True)):
        assert (got["loss"], got["grad_norm"], got["lr"]) == (want["loss"], want["grad_norm"], want["lr"]), step
    assert plain["validation"] == fsdp["validation"]
    assert plain["generated"] == fsdp["generated"]
    got = AutoModelForCausalLM.from_pretrained(plain["hf_path"], dtype=torch.float32).state_dict()
    want = AutoModelForCausalLM.from_pretrained(fsdp["hf_path"], dtype=torch.float32).state_dict()
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name


def _train_save_step(rank, model_dir, out_dir):
    """Step 1, a resumable checkpoint, step 2: the uninterrupted run."""
    worker = DTensorPolicyWorker(policy_config(model_dir), seed=1, device="cpu")
    train_step(worker, 0)
    worker.save_checkpoint(weights_path=os.path.join(out_dir, "weights"), optimizer_path=os.path.join(out_dir, "optim"))
    second = train_step(worker, 1)
    logits = worker.get_logits(make_batch(9))
    worker.shutdown()
    return {"step": second, "logits": logits, "plain": worker.fully_sharded is False}


def _resume_step(rank, model_dir, out_dir):
    return resume_and_step(model_dir, out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("saved_on, resumed_on", [(1, 2), (2, 1)])
def test_checkpoints_move_between_plain_and_fsdp(tmp_path, saved_on, resumed_on):
    model_dir = save_tiny_llama(str(tmp_path / "model"))
    out_dir = str(tmp_path / "checkpoint")
    want = run_ranks(saved_on, _train_save_step, model_dir, out_dir)[0]
    got = run_ranks(resumed_on, _resume_step, model_dir, out_dir)[0]
    assert (want["plain"], got["plain"]) == (saved_on == 1, resumed_on == 1)
    # Another world size sums the gradients in another order: fp32 rounding, no more.
    assert got["step"]["loss"] == pytest.approx(want["step"]["loss"], rel=1e-5)
    assert got["step"]["grad_norm"] == pytest.approx(want["step"]["grad_norm"], rel=1e-5)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)


def test_fsdp_is_skipped_only_for_one_full_precision_rank():
    assert not fsdp_is_needed(1, param_dtype=torch.float32, cpu_offload=False)
    assert fsdp_is_needed(2, param_dtype=torch.float32, cpu_offload=False)
    assert fsdp_is_needed(1, param_dtype=torch.bfloat16, cpu_offload=False)  # FSDP casts for compute
    assert fsdp_is_needed(1, param_dtype=torch.float32, cpu_offload=True)
