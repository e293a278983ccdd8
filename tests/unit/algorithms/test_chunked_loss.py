"""The chunked loss from hidden states against the plain loss on full logits: same value,
same gradients (for the hidden states and the output layer), whatever the chunk size."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from nemo_rl.algorithms.chunked_loss import _chunk_nll_sum, chunked_nll_sum
from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.data.targets import count_valid_tokens, target_mask
from nemo_rl.data.batched_data_dict import BatchedDataDict

B, T, H, V = 5, 11, 8, 37


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([11, 7, 3, 9, 11])
    input_ids = torch.randint(0, V, (B, T), generator=g)
    token_mask = torch.zeros(B, T)
    for b, (start, length) in enumerate(zip([2, 1, 1, 4, 0], lengths.tolist())):
        input_ids[b, length:] = 0
        token_mask[b, start:length] = 1.0
    token_mask[4, 5] = 0.5  # fractional weights are carried as in the plain loss
    batch = BatchedDataDict(
        input_ids=input_ids,
        input_lengths=lengths,
        token_mask=token_mask,
        sample_mask=torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]),
    )
    hidden = torch.randn(B, T, H, generator=g)
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    return batch, hidden, head


def _grads(loss, hidden, head):
    loss.backward()
    grads = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad, head.weight.grad, head.bias.grad = None, None, None
    return grads


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_chunked_nll_equals_plain_loss_and_gradients(chunk_tokens):
    batch, hidden, head = _case()
    hidden.requires_grad_()
    global_tokens = count_valid_tokens(batch)

    plain, _ = NLLLoss()(head(hidden), batch, global_tokens)
    want = _grads(plain, hidden, head)

    nll_sum = chunked_nll_sum(hidden, head, batch["input_ids"], target_mask(batch), chunk_tokens=chunk_tokens)
    chunked = nll_sum / global_tokens.float()
    got = _grads(chunked, hidden, head)

    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert got[0][2].abs().sum() == 0  # row 2 (sample_mask 0) gets no gradient


def test_nll_loss_from_hidden_states_equals_the_loss_on_logits():
    batch, hidden, head = _case(1)
    global_tokens = count_valid_tokens(batch) + 10  # as if other micro-batches held more
    want, want_metrics = NLLLoss()(head(hidden), batch, global_tokens)
    got, got_metrics = NLLLoss().from_hidden_states(hidden, head, batch, global_tokens)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_metrics["nll_sum"], want_metrics["nll_sum"], rtol=1e-6, atol=0)
    assert got_metrics["num_valid_tokens"] == want_metrics["num_valid_tokens"]


def test_no_target_gives_a_zero_that_still_reaches_the_hidden_states_and_the_head():
    batch, hidden, head = _case()
    batch["sample_mask"] = torch.zeros(B)
    hidden.requires_grad_()
    nll_sum = chunked_nll_sum(hidden, head, batch["input_ids"], target_mask(batch))
    assert nll_sum.item() == 0.0
    nll_sum.backward()  # would raise if the zero were cut off from the graph
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    # Every parameter gets a gradient, as on ranks with targets: FSDP reduces them all.
    assert head.weight.grad is not None and torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def test_default_chunks_bound_the_logits_held_at_once(monkeypatch):
    """With a small budget of logits per chunk, the output layer never sees more rows."""
    batch, hidden, head = _case()
    monkeypatch.setattr("nemo_rl.algorithms.chunked_loss.CHUNK_LOGIT_ELEMENTS", 3 * V)
    rows_seen = []
    head.register_forward_hook(lambda module, args, out: rows_seen.append(out.shape[0]))
    chunked_nll_sum(hidden, head, batch["input_ids"], target_mask(batch))
    assert max(rows_seen) == 3
    assert sum(rows_seen) == int((target_mask(batch) != 0).sum())


@pytest.mark.parametrize("chunk_tokens, recomputed", [(1000, False), (3, True)])
def test_the_output_layer_is_recomputed_only_when_there_are_several_chunks(chunk_tokens, recomputed):
    """One chunk keeps its logits for backward (no second forward of the output layer);
    several chunks recompute each one's in backward, so only one chunk's logits are held."""
    batch, hidden, head = _case()
    hidden.requires_grad_()
    forwards = []
    head.register_forward_hook(lambda module, args, out: forwards.append(out.shape[0]))
    chunked_nll_sum(hidden, head, batch["input_ids"], target_mask(batch), chunk_tokens=chunk_tokens).backward()
    num_targets = int((target_mask(batch) != 0).sum())
    assert sum(forwards) == (2 if recomputed else 1) * num_targets


def test_keeping_the_logits_gives_the_recomputed_gradients_bit_for_bit():
    """Why a single chunk may skip the recomputation without changing any result."""
    batch, hidden, head = _case()
    hidden.requires_grad_()
    mask = target_mask(batch)

    def nll_sum(recompute):
        keep = mask != 0
        arguments = (head, hidden[:, :-1][keep], batch["input_ids"][:, 1:][keep], mask[keep].to(torch.float32))
        return checkpoint(_chunk_nll_sum, *arguments, use_reentrant=False) if recompute else _chunk_nll_sum(*arguments)

    recomputed_loss = nll_sum(True)
    recomputed = _grads(recomputed_loss, hidden, head)
    kept_loss = nll_sum(False)
    kept = _grads(kept_loss, hidden, head)
    assert torch.equal(kept_loss, recomputed_loss)
    for got, want in zip(kept, recomputed):
        assert torch.equal(got, want)
