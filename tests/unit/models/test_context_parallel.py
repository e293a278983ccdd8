"""Context parallelism's pieces: the load-balanced shards, the loss batch, the mask, and the
attention with its all-gather on 2 gloo ranks against plain SDPA over the whole row."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tests.unit.distributed_helpers import run_ranks
from torch import nn

from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.data.targets import count_valid_tokens, target_mask
from nemo_rl.models.context_parallel import (
    check_attention_was_hooked,
    context_parallel_attention,
    enable_context_parallel_attention,
    load_balanced_indices,
    shard_micro_batch,
)

# Three packed samples of 5, 3 and 6 tokens, then 2 tokens of padding (positions 0, as pack_rows).
SAMPLE_LENGTHS = [5, 3, 6]
PADDING = 2


def _packed_positions() -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in SAMPLE_LENGTHS] + [torch.zeros(PADDING, dtype=torch.int64)])[None]


def _sample_of_each_token() -> list[int]:
    """Independent of the code under test: sample k for the tokens of sample k, a new one per
    padding token (each padding token attends to itself only)."""
    owners = [k for k, n in enumerate(SAMPLE_LENGTHS) for _ in range(n)]
    return owners + [len(SAMPLE_LENGTHS) + p for p in range(PADDING)]


@pytest.mark.parametrize("cp_size", [2, 3])
def test_each_rank_gets_two_chunks_with_the_same_causal_work(cp_size):
    length = 4 * cp_size
    shards = [load_balanced_indices(length, cp_size, rank) for rank in range(cp_size)]
    assert sorted(torch.cat(shards).tolist()) == list(range(length))
    # Token t attends to t + 1 keys: the two chunks i and 2cp-1-i add up to the same on every rank.
    work = {int((indices + 1).sum()) for indices in shards}
    assert len(work) == 1
    assert load_balanced_indices(8, 2, 1).tolist() == [2, 3, 4, 5]


def test_a_row_length_not_a_multiple_of_twice_cp_is_refused():
    with pytest.raises(ValueError, match=r"row length \(10\) to be a multiple of 2 x cp = 4"):
        load_balanced_indices(10, 2, 0)


def test_a_model_whose_attention_cannot_be_replaced_is_refused():
    with pytest.raises(ValueError, match="context_parallel_size: Linear's attention cannot be replaced"):
        enable_context_parallel_attention(nn.Linear(2, 2))


def test_a_forward_whose_layers_bypassed_the_attention_is_refused():
    layout = shard_micro_batch(_micro_batch(), cp_size=2, cp_rank=0, group=None).layout
    layout.attention_calls = 1
    with pytest.raises(RuntimeError, match="ran the context-parallel attention in 1 of its 2 layers"):
        check_attention_was_hooked(layout, 2, "tiny")


def _micro_batch() -> BatchedDataDict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 100, (2, 13), generator=g)
    token_mask = (torch.rand((2, 13), generator=g) > 0.3).float()
    return BatchedDataDict(
        input_ids=input_ids, token_mask=token_mask, sample_mask=torch.tensor([1.0, 1.0]), input_lengths=torch.tensor([13, 13])
    )


def test_the_loss_batch_pairs_each_local_token_with_its_next_token():
    mb = _micro_batch()
    total_targets = 0.0
    for rank in range(2):
        local = shard_micro_batch(mb, cp_size=2, cp_rank=rank, group=None)
        index = local.layout.query_index_L
        assert local.model_inputs["input_ids"].shape == (2, 8)  # 13 padded to 16, halved
        assert torch.equal(local.model_inputs["position_ids"], index[None].expand(2, -1))
        for local_pos, global_pos in enumerate(index.tolist()):
            next_id = mb["input_ids"][:, global_pos + 1] if global_pos + 1 < 13 else torch.zeros(2, dtype=torch.int64)
            next_mask = mb["token_mask"][:, global_pos + 1] if global_pos + 1 < 13 else torch.zeros(2)
            assert torch.equal(local.loss_batch["input_ids"][:, local_pos + 1], next_id)
            assert torch.equal(local.loss_batch["token_mask"][:, local_pos + 1], next_mask)
        total_targets += float(target_mask(local.loss_batch).sum())
    assert total_targets == float(count_valid_tokens(mb))


def test_the_mask_of_a_packed_row_is_causal_within_each_sample():
    length = sum(SAMPLE_LENGTHS) + PADDING
    mb = BatchedDataDict(
        input_ids=torch.arange(1, length + 1)[None],
        position_ids=_packed_positions(),
        token_mask=torch.ones(1, length),
        sample_mask=torch.ones(1),
    )
    owner = _sample_of_each_token()
    for rank in range(2):
        layout = shard_micro_batch(mb, cp_size=2, cp_rank=rank, group=None).layout
        mask_LT = layout.mask()[0, 0]
        for l, q in enumerate(layout.query_index_L.tolist()):
            for t, k in enumerate(layout.key_index_T.tolist()):
                want = k <= q and owner[q] == owner[k]
                assert bool(mask_LT[l, t]) == want, (rank, q, k)


def _attention_on_two_ranks(rank: int) -> dict[str, float]:
    """Context-parallel attention on this rank's tokens vs SDPA over the whole packed row, values
    and gradients (GQA: 4 query heads, 2 KV heads)."""
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)  # the same row on both ranks
        length, dim = sum(SAMPLE_LENGTHS) + PADDING, 8
        q, k, v = (torch.randn(1, heads, length, dim, dtype=torch.float64) for heads in (4, 2, 2))
        weight_BTHD = torch.randn(1, length, 4, dim, dtype=torch.float64)
        owner = torch.tensor(_sample_of_each_token())
        allowed_TT = (torch.arange(length)[None] <= torch.arange(length)[:, None]) & (owner[:, None] == owner[None])
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        out_BHTD = F.scaled_dot_product_attention(
            full[0], full[1].repeat_interleave(2, 1), full[2].repeat_interleave(2, 1), attn_mask=allowed_TT
        )
        (out_BHTD.transpose(1, 2) * weight_BTHD).sum().backward()

        mb = BatchedDataDict(
            input_ids=torch.zeros(1, length, dtype=torch.int64),
            position_ids=_packed_positions(),
            token_mask=torch.ones(1, length),
            sample_mask=torch.ones(1),
        )
        layout = shard_micro_batch(mb, cp_size=2, cp_rank=rank, group=None).layout
        index = layout.query_index_L
        local = [x[:, :, index].clone().requires_grad_() for x in (q, k, v)]
        out_BLHD, _ = context_parallel_attention(nn.Module(), *local, None, scaling=dim**-0.5, cp_layout=layout)
        (out_BLHD * weight_BTHD[:, index]).sum().backward()
        errors = {"output": (out_BLHD - out_BHTD.transpose(1, 2)[:, index]).abs().max().item()}
        for name, got, want in zip("qkv", local, full):
            errors[f"grad_{name}"] = (got.grad - want.grad[:, :, index]).abs().max().item()
        errors["calls"] = layout.attention_calls
        return errors
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_attention_equals_sdpa_over_the_whole_row():
    for errors in run_ranks(2, _attention_on_two_ranks):
        assert errors.pop("calls") == 1
        assert max(errors.values()) < 1e-12, errors
