"""NLLLoss against an independent computation: F.cross_entropy on shifted, -100-masked labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.data.targets import count_valid_tokens
from nemo_rl.data.batched_data_dict import BatchedDataDict

B, T, V = 6, 9, 11


def _batch() -> tuple[BatchedDataDict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 7, 4, 9, 6, 3])
    input_ids = torch.randint(0, V, (B, T), generator=g)
    token_mask = torch.zeros(B, T)
    for b, (start, length) in enumerate(zip([3, 1, 2, 5, 4, 1], lengths.tolist())):
        input_ids[b, length:] = 0
        token_mask[b, start:length] = 1.0
    token_mask[3, 0] = 1.0  # token 0 is never a target, whatever the mask says
    sample_mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    batch = BatchedDataDict(
        input_ids=input_ids, input_lengths=lengths, token_mask=token_mask, sample_mask=sample_mask
    )
    logits_BTV = torch.randn(B, T, V, generator=g, dtype=torch.float64).to(torch.float32)
    return batch, logits_BTV


def _reference(batch: BatchedDataDict, logits_BTV: torch.Tensor) -> torch.Tensor:
    labels = batch["input_ids"].clone()
    labels[(batch["token_mask"] == 0) | (batch["sample_mask"][:, None] == 0)] = -100
    return F.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="mean"
    )


def test_whole_batch_equals_mean_cross_entropy():
    batch, logits = _batch()
    loss, metrics = NLLLoss()(logits, batch, count_valid_tokens(batch))
    torch.testing.assert_close(loss, _reference(batch, logits), rtol=1e-6, atol=0)
    # rows 2 and 5 are masked out; row 3's token 0 does not count
    assert metrics["num_valid_tokens"].item() == (9 - 3) + (7 - 1) + (9 - 5) + (6 - 4)


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_micro_batch_losses_sum_to_the_global_mean(split):
    batch, logits = _batch()
    global_tokens = count_valid_tokens(batch)
    parts = [(batch.slice(0, split), logits[:split]), (batch.slice(split, B), logits[split:])]
    total = sum(NLLLoss()(lg, mb, global_tokens)[0] for mb, lg in parts)
    torch.testing.assert_close(total, _reference(batch, logits), rtol=1e-6, atol=0)


def test_gradient_of_summed_micro_batch_losses_equals_global_gradient():
    batch, logits = _batch()
    whole = logits.clone().requires_grad_()
    _reference(batch, whole).backward()
    parts = logits.clone().requires_grad_()
    global_tokens = count_valid_tokens(batch)
    for lo, hi in [(0, 2), (2, 6)]:
        NLLLoss()(parts[lo:hi], batch.slice(lo, hi), global_tokens)[0].backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-6, atol=1e-8)


def test_log_softmax_runs_in_fp32_for_low_precision_logits():
    batch, logits = _batch()
    loss, _ = NLLLoss()(logits.to(torch.bfloat16), batch, count_valid_tokens(batch))
    assert loss.dtype == torch.float32
    expected = _reference(batch, logits.to(torch.bfloat16).float())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_all_masked_global_batch_has_zero_loss_not_nan():
    batch, logits = _batch()
    batch["sample_mask"] = torch.zeros(B)
    loss, _ = NLLLoss()(logits, batch, count_valid_tokens(batch))
    assert loss.item() == 0.0
