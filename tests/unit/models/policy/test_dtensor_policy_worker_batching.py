"""DTensorPolicyWorker with sequence packing, dynamic batching and compiled layers, in 1 and 2
gloo processes, against the plain single-process PyTorch reference.

  world 1: A. packing (modified first-fit decreasing), 3 steps;
           B. compiled decoder layers (dynamo with the `aot_eager` backend, so the test needs
              no C++ toolchain and stays fast; the benchmark runs inductor), packing, 1 step.
  world 2: C. dynamic batching, 3 steps;
           D. packing (first-fit decreasing) under eager attention
              (dtensor_cfg.attn_implementation), 3 steps.

Step 2 is skewed: rank 0 holds four long samples, rank 1 one short one and three with no
loss, so the ranks' micro-batch counts differ and rank 1 must add filler micro-batches
(FSDP would hang, or the update differ, if the counts were not agreed).
"""

from __future__ import annotations

import functools

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import (
    SEQ_LEN,
    VOCAB,
    make_batch,
    policy_config,
    reference_training,
    save_tiny_llama,
)
from transformers import AutoModelForCausalLM

from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.models.policy.workers import dtensor_policy_worker
from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker
from nemo_rl.utils.flops import training_flops

# Slow: three-step runs of four workers in 1 and 2 processes (one compiled); the fast tier keeps
# packing and dynamic batching on a model in one process (test_micro_batching.py).
pytestmark = pytest.mark.slow

PACKING = {"enabled": True, "train_mb_tokens": SEQ_LEN, "sequence_length_round": 4}
DYNAMIC = {"enabled": True, "train_mb_tokens": 2 * SEQ_LEN, "sequence_length_round": 8}


def skewed_batch() -> BatchedDataDict:
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([16, 15, 14, 13, 5, 9, 12, 4])
    input_ids = torch.zeros(8, SEQ_LEN, dtype=torch.int64)
    token_mask = torch.zeros(8, SEQ_LEN)
    for b, n in enumerate(lengths.tolist()):
        input_ids[b, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        token_mask[b, 2:n] = 1.0
    sample_mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    return BatchedDataDict(input_ids=input_ids, input_lengths=lengths, token_mask=token_mask, sample_mask=sample_mask)


def _batches():
    return [make_batch(0), skewed_batch(), make_batch(2)]


def _run(worker, batches, rank, world_size):
    history = [worker.train(b.shard_by_batch_size(world_size)[rank], NLLLoss(), MicroBatchPlan.for_training(worker.cfg)) for b in batches]
    return {"history": history, "logits": worker.get_logits(make_batch(5))}


def _world1(rank, model_dir):
    results = {}
    worker = DTensorPolicyWorker(policy_config(model_dir, sequence_packing=PACKING), seed=1, device="cpu")
    results["w1_packing"] = _run(worker, _batches(), rank, 1)
    del worker

    dtensor_policy_worker.apply_compile = functools.partial(dtensor_policy_worker.apply_compile, backend="aot_eager")
    cfg = policy_config(model_dir, sequence_packing=PACKING, dtensor_cfg={"compile": True})
    worker = DTensorPolicyWorker(cfg, seed=1, device="cpu")
    results["w1_compiled_packing"] = _run(worker, _batches()[:1], rank, 1)
    worker.shutdown()
    return results


def _world2(rank, model_dir):
    results = {}
    worker = DTensorPolicyWorker(policy_config(model_dir, dynamic_batching=DYNAMIC), seed=1, device="cpu")
    results["w2_dynamic"] = _run(worker, _batches(), rank, 2)
    del worker
    ffd = {**PACKING, "algorithm": "first_fit_decreasing"}
    cfg = policy_config(model_dir, sequence_packing=ffd, dtensor_cfg={"attn_implementation": "eager"})
    worker = DTensorPolicyWorker(cfg, seed=1, device="cpu")
    results["w2_packing_ffd"] = _run(worker, _batches(), rank, 2)
    results["w2_packing_ffd"]["attn_implementation"] = worker.model.config._attn_implementation
    worker.shutdown()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtensor_worker_batching")
    model_dir = save_tiny_llama(str(root / "tiny_llama"))
    (w1,) = run_ranks(1, _world1, model_dir)
    w2, _ = run_ranks(2, _world2, model_dir)
    history, reference_model = reference_training(model_dir, _batches())
    with torch.no_grad():
        reference_logits = reference_model(input_ids=make_batch(5)["input_ids"]).logits
    return {
        **w1,
        **w2,
        "reference": history,
        "reference_logits": reference_logits,
        "model_dir": model_dir,
    }


@pytest.mark.parametrize("name", ["w1_packing", "w2_dynamic", "w2_packing_ffd", "w1_compiled_packing"])
def test_losses_and_updates_match_plain_batching(runs, name):
    got = runs[name]["history"]
    for step, (g, want) in enumerate(zip(got, runs["reference"])):
        assert g["loss"] == pytest.approx(want["loss"], rel=1e-5), f"step {step + 1} loss"
        assert g["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), f"step {step + 1} grad_norm"
    if len(got) == len(runs["reference"]):  # the trained weights, seen through their logits
        torch.testing.assert_close(runs[name]["logits"], runs["reference_logits"], rtol=1e-5, atol=1e-5)


def test_attn_implementation_reaches_the_model(runs):
    assert runs["w2_packing_ffd"]["attn_implementation"] == "eager"
    assert AutoModelForCausalLM.from_pretrained(runs["model_dir"]).config._attn_implementation == "sdpa"


def test_metrics_count_tokens_and_model_flops(runs):
    first = runs["w2_dynamic"]["history"][0]
    batch = make_batch(0)
    real_lengths = batch["input_lengths"][batch["sample_mask"] > 0]
    assert first["num_tokens"] == int(real_lengths.sum())
    config = AutoModelForCausalLM.from_pretrained(runs["model_dir"]).config
    targets = int((batch["token_mask"][:, 1:] * batch["sample_mask"][:, None]).sum())
    assert first["model_flops"] == pytest.approx(training_flops(config, real_lengths.tolist(), num_targets=targets))
    assert first["peak_flops"] > 0  # measured on CPU
