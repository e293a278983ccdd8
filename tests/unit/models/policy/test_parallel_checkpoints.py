"""Checkpoints under tensor parallelism: a TP 2 run saved after step 1 resumes bit-exactly with
the same layout, resumes with another (TP 2 -> DP 2) within fp32 rounding, and its `hf/` export
loads with `from_pretrained` and holds the single-process reference's weights."""

from __future__ import annotations

import os

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import (
    make_batch,
    policy_config,
    reference_training,
    resume_and_step,
    save_tiny_llama,
    train_step,
)
from transformers import AutoModelForCausalLM

from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker

TP2 = {"tensor_parallel_size": 2}


def _train_and_save(rank, model_dir, out_dir):
    """TP 2: step 1, save (resumable state and hf/), step 2: the uninterrupted run."""
    worker = DTensorPolicyWorker(policy_config(model_dir, dtensor_cfg=TP2), seed=1, device="cpu")
    first = train_step(worker, 0)
    worker.save_checkpoint(
        weights_path=os.path.join(out_dir, "weights"),
        optimizer_path=os.path.join(out_dir, "optim"),
        hf_path=os.path.join(out_dir, "hf"),
    )
    second = train_step(worker, 1)
    logits = worker.get_logits(make_batch(9))  # a collective: every rank calls it
    if rank == 0:
        torch.save({"steps": [first, second], "logits": logits}, os.path.join(out_dir, "uninterrupted.pt"))
    worker.shutdown()


def _resume(rank, model_dir, out_dir, dtensor_cfg, name):
    resumed = resume_and_step(model_dir, out_dir, dtensor_cfg=dtensor_cfg)
    if rank == 0:
        torch.save({"step": resumed["step"], "logits": resumed["logits"]}, os.path.join(out_dir, f"{name}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_checkpoints")
    model_dir = save_tiny_llama(str(root / "model"), tie_word_embeddings=True)
    out_dir = str(root / "out")
    os.makedirs(out_dir)
    run_ranks(2, _train_and_save, model_dir, out_dir)
    run_ranks(2, _resume, model_dir, out_dir, TP2, "resumed_tp2")
    run_ranks(2, _resume, model_dir, out_dir, {}, "resumed_dp2")
    history, _ = reference_training(model_dir, [make_batch(0)])
    return out_dir, model_dir, history


@pytest.mark.slow
def test_same_layout_resume_is_bit_exact(runs):
    out_dir, _, _ = runs
    want = torch.load(os.path.join(out_dir, "uninterrupted.pt"))
    got = torch.load(os.path.join(out_dir, "resumed_tp2.pt"))
    assert got["step"]["loss"] == want["steps"][1]["loss"]
    assert got["step"]["grad_norm"] == want["steps"][1]["grad_norm"]
    assert torch.equal(got["logits"], want["logits"])


@pytest.mark.slow
def test_resume_across_layouts_tp2_to_dp2(runs):
    out_dir, _, _ = runs
    want = torch.load(os.path.join(out_dir, "uninterrupted.pt"))
    got = torch.load(os.path.join(out_dir, "resumed_dp2.pt"))
    assert got["step"]["loss"] == pytest.approx(want["steps"][1]["loss"], rel=1e-5)
    assert got["step"]["grad_norm"] == pytest.approx(want["steps"][1]["grad_norm"], rel=1e-5)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_hf_export_under_tp_loads_with_the_reference_weights(runs):
    out_dir, model_dir, _ = runs
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "hf"), dtype=torch.float32)
    _, reference = reference_training(model_dir, [make_batch(0)])
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()  # still tied
    want = reference.state_dict()
    for name, tensor in exported.state_dict().items():
        error = (tensor - want[name]).norm() / want[name].norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
