"""An untied output head under FSDP2 when one rank's micro-batch carries no target token.

With the chunked loss such a rank never multiplies by the head, so unless the loss still sends
a (zero) gradient through it, that rank reduce-scatters fewer gradients than the others: gloo
aborts, NCCL hangs or mixes tensors. The step must instead equal the single-process reference.
"""

from __future__ import annotations

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import make_batch, policy_config, reference_training, save_tiny_llama

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker


def _batch_without_targets_on_rank_1():
    batch = make_batch(0)
    batch["sample_mask"][4:] = 0.0  # the second half, rank 1's shard, carries no loss
    return batch


def _one_step(rank, model_dir):
    worker = DTensorPolicyWorker(policy_config(model_dir), seed=1, device="cpu")
    assert worker.chunked_loss
    local = _batch_without_targets_on_rank_1().shard_by_batch_size(2)[rank]
    result = {"step": worker.train(local, NLLLoss(), MicroBatchPlan(4)), "logits": worker.get_logits(make_batch(5))}
    worker.shutdown()
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("untied_head")
    model_dir = save_tiny_llama(str(root / "tiny_llama_untied"), tie_word_embeddings=False)
    rank0, _ = run_ranks(2, _one_step, model_dir)
    history, reference_model = reference_training(model_dir, [_batch_without_targets_on_rank_1()])
    with torch.no_grad():
        reference_logits = reference_model(input_ids=make_batch(5)["input_ids"]).logits
    return rank0, history[0], reference_logits


def test_the_step_equals_the_single_process_reference(run):
    got, want, reference_logits = run
    assert got["step"]["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["step"]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    torch.testing.assert_close(got["logits"], reference_logits, rtol=1e-5, atol=1e-5)
