"""A non-finite loss on any rank: no rank applies the update, the schedule still advances, and
the driver stops naming the step (or goes on with sft.skip_non_finite_updates)."""

from __future__ import annotations

import os

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks
from tests.unit.models.policy.policy_test_utils import EXPECTED_LRS, make_batch, policy_config, save_tiny_llama

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy.micro_batching import MicroBatchPlan
from nemo_rl.algorithms.sft import _stop_on_non_finite
from nemo_rl.models.policy.workers.dtensor_policy_worker import DTensorPolicyWorker


class NaNOnRankOne(NLLLoss):
    """The plain loss, except that rank 1's is NaN (one bad micro-batch somewhere)."""

    def __call__(self, logits, batch, global_valid_tokens):
        loss, metrics = super().__call__(logits, batch, global_valid_tokens)
        if int(os.environ["RANK"]) == 1:
            loss = loss * float("nan")
        return loss, metrics


def _poisoned_step(rank, model_dir):
    worker = DTensorPolicyWorker(policy_config(model_dir, dtensor_cfg={"chunked_loss": False}), seed=1, device="cpu")
    probe = make_batch(9)
    local = [make_batch(seed).shard_by_batch_size(2)[rank] for seed in range(3)]
    results = {"step1": worker.train(local[0], NLLLoss(), MicroBatchPlan(2)), "logits1": worker.get_logits(probe)}
    results["step2"] = worker.train(local[1], NaNOnRankOne(), MicroBatchPlan(2))
    results["logits2"] = worker.get_logits(probe)
    results["step3"] = worker.train(local[2], NLLLoss(), MicroBatchPlan(2))
    results["logits3"] = worker.get_logits(probe)
    worker.shutdown()
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):  # used by slow tests only: three steps of a 2-rank group
    root = tmp_path_factory.mktemp("non_finite")
    model_dir = save_tiny_llama(str(root / "tiny_llama"))
    return run_ranks(2, _poisoned_step, model_dir)


@pytest.mark.slow
def test_every_rank_skips_the_update_and_the_weights_stay(ranks):
    for result in ranks:
        assert result["step2"]["update_skipped"] is True
        assert not torch.isfinite(torch.tensor(result["step2"]["loss"]))
        torch.testing.assert_close(result["logits2"], result["logits1"], rtol=0, atol=0)
        assert result["step1"]["update_skipped"] is False and result["step3"]["update_skipped"] is False


@pytest.mark.slow
def test_the_schedule_advances_and_training_goes_on(ranks):
    for result in ranks:
        assert [result[f"step{i}"]["lr"] for i in (1, 2, 3)] == pytest.approx(EXPECTED_LRS)
        assert torch.isfinite(torch.tensor(result["step3"]["loss"]))
        assert torch.isfinite(result["logits3"]).all()
        assert not torch.equal(result["logits3"], result["logits2"])


class _Reporter:
    def __init__(self):
        self.lines = []

    def print(self, text):
        self.lines.append(text)


def test_the_driver_stops_naming_the_step_or_goes_on_when_told():
    bad = {"loss": float("nan"), "grad_norm": 1.0}
    with pytest.raises(FloatingPointError, match=r"step 7: loss=nan grad_norm=1.0 is not finite; the update was not applied.*skip_non_finite_updates=true"):
        _stop_on_non_finite(bad, 7, skip=False, reporter=_Reporter())
    reporter = _Reporter()
    _stop_on_non_finite({"loss": 2.0, "grad_norm": float("inf")}, 8, skip=True, reporter=reporter)
    assert reporter.lines == ["step 8: loss=2.0 grad_norm=inf is not finite; update skipped (sft.skip_non_finite_updates=true)"]
    _stop_on_non_finite({"loss": 2.0, "grad_norm": 1.0}, 9, skip=False, reporter=reporter)
    assert len(reporter.lines) == 1
