"""The Megatron loss on vocabulary-sharded logits (training_step.VocabularyLogits) against the
algorithm's loss on the whole vocabulary in one process: same loss, same logit gradients.

The logits are random rather than a model's: what is under test is the loss over the shards
(padding columns included), not the model, which test_hf_conversion covers."""

from __future__ import annotations

import pytest
import torch
from tests.unit.distributed_helpers import run_ranks

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.data.batched_data_dict import BatchedDataDict

pytest.importorskip("megatron.core")

VOCAB = 127  # TP 2 pads it to 128 columns: the last column of rank 1 is not a token
B, T = 3, 9
GLOBAL_VALID_TOKENS = 40.0  # as if other micro-batches and ranks held more targets


def _logits_and_batch() -> tuple[torch.Tensor, BatchedDataDict]:
    generator = torch.Generator().manual_seed(0)
    logits_BTV = 3.0 * torch.randn(B, T, VOCAB, generator=generator)
    batch = BatchedDataDict(
        input_ids=torch.randint(0, VOCAB, (B, T), generator=generator),
        token_mask=(torch.rand(B, T, generator=generator) > 0.3).long(),
        sample_mask=torch.tensor([1.0, 1.0, 0.0]),
    )
    return logits_BTV, batch


def _whole_vocabulary_loss() -> tuple[float, torch.Tensor]:
    logits_BTV, batch = _logits_and_batch()
    logits_BTV.requires_grad_()
    loss, _ = NLLLoss()(logits_BTV, batch, torch.tensor(GLOBAL_VALID_TOKENS))
    loss.backward()
    return loss.item(), logits_BTV.grad


def _sharded_loss_scenario(rank: int) -> dict:
    """The loss and this rank's logit gradients at TP 2, then at TP 1 (2 data-parallel ranks)."""
    from nemo_rl.models.megatron import parallel_state
    from nemo_rl.models.megatron.cpu_support import enable_megatron_on_cpu
    from nemo_rl.models.megatron.training_step import VocabularyLogits

    torch.distributed.init_process_group("gloo")
    enable_megatron_on_cpu()
    results = {}
    for tp in (2, 1):
        parallel_state.initialize_model_parallel(tp, 1)
        tp_rank = rank % tp
        logits_BTV, batch = _logits_and_batch()
        # The output layer's rows past the vocabulary are zeros, but their logits need not be
        # 0 (a bias, or rows that have been trained): a large value would show if they counted.
        columns = -(-VOCAB // tp)
        padded_BTV = torch.cat([logits_BTV, torch.full((B, T, columns * tp - VOCAB), 50.0)], dim=-1)
        local_BTV = padded_BTV[..., tp_rank * columns : (tp_rank + 1) * columns].clone().requires_grad_()

        vocabulary = VocabularyLogits(VOCAB, torch.device("cpu"))
        with vocabulary.loss_context():
            loss, metrics = NLLLoss()(vocabulary(local_BTV), batch, torch.tensor(GLOBAL_VALID_TOKENS))
            loss.backward()
        results[tp] = {"loss": loss.item(), "grad": local_BTV.grad, "num_valid_tokens": metrics["num_valid_tokens"].item()}
        parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return results


# Slow: two fresh processes that import megatron-core.
@pytest.mark.slow
def test_loss_from_vocabulary_shards_matches_the_whole_vocabulary():
    want_loss, want_grad_BTV = _whole_vocabulary_loss()
    targets_of_kept_rows = float(_logits_and_batch()[1]["token_mask"][:2, 1:].sum())
    results = run_ranks(2, _sharded_loss_scenario)

    # TP 2: the same loss and gradients from each rank's half of the (padded) vocabulary.
    columns = results[0][2]["grad"].shape[-1]
    for rank, by_tp in enumerate(results):
        got = by_tp[2]
        assert got["loss"] == pytest.approx(want_loss, rel=1e-6)
        assert got["num_valid_tokens"] == targets_of_kept_rows
        real = want_grad_BTV[..., rank * columns : (rank + 1) * columns]
        torch.testing.assert_close(got["grad"][..., : real.shape[-1]], real, rtol=1e-5, atol=1e-7)
        # Padding columns carry no probability, hence no gradient.
        assert torch.all(got["grad"][..., real.shape[-1] :] == 0)

    # TP 1: the plain loss on plain logits, bit for bit.
    for by_tp in results:
        assert by_tp[1]["loss"] == want_loss
        assert torch.equal(by_tp[1]["grad"], want_grad_BTV)
