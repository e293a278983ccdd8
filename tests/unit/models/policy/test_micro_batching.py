"""Token-budget micro-batches: grouping, equal counts over ranks, and — on a real tiny Llama
in one process — that packed and dynamic micro-batches give the loss and gradients of plain
padded batching."""

from __future__ import annotations

import pytest
import torch
from tests.unit.models.policy.policy_test_utils import VOCAB, policy_config, tiny_llama

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.data.targets import count_valid_tokens, target_mask
from nemo_rl.models.policy.forward import forward_hidden_states, forward_logits
from nemo_rl.models.policy.micro_batching import (
    MicroBatchPlan,
    dynamic_batch_groups,
    micro_batches as split_micro_batches,
    spread_to_count,
    token_budget_micro_batches,
)

SEQ = 40


def _same_count(n: int) -> int:
    return n


def _mixed_batch(seed: int = 0) -> BatchedDataDict:
    """Right-padded samples of very different lengths (2 to 40); one is a target from its
    first token on (which packing must not predict from the previous sample), one has
    sample_mask 0 and one has no target token at all."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([40, 3, 17, 2, 33, 9, 25, 5])
    input_ids = torch.zeros(len(lengths), SEQ, dtype=torch.int64)
    token_mask = torch.zeros(len(lengths), SEQ)
    for b, n in enumerate(lengths.tolist()):
        input_ids[b, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        token_mask[b, n // 2 : n] = 1.0
    token_mask[1, :3] = 1.0  # all of it
    token_mask[5] = 0.0  # no target
    sample_mask = torch.ones(len(lengths))
    sample_mask[6] = 0.0
    return BatchedDataDict(input_ids=input_ids, input_lengths=lengths, token_mask=token_mask, sample_mask=sample_mask)


def _cfg(**overrides):
    return policy_config("unused", max_total_sequence_length=SEQ, **overrides)


def _train_plan(**overrides) -> MicroBatchPlan:
    return MicroBatchPlan.for_training(_cfg(**overrides))


PACKING = dict(sequence_packing={"enabled": True, "train_mb_tokens": 48, "sequence_length_round": 8})
PACKING_FFD = dict(
    sequence_packing={"enabled": True, "train_mb_tokens": 64, "algorithm": "first_fit_decreasing", "sequence_length_round": 1}
)
PACKING_LARGEST_FIRST = dict(sequence_packing={**PACKING["sequence_packing"], "microbatch_order": "largest_first"})
DYNAMIC = dict(dynamic_batching={"enabled": True, "train_mb_tokens": 64, "sequence_length_round": 8})


# ---------------------------------------------------------------- grouping


def test_dynamic_batch_groups_stay_within_the_token_budget():
    lengths = [40, 3, 17, 2, 33, 9, 25, 5, 12, 12]
    groups = dynamic_batch_groups(lengths, budget=64, multiple=8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        width = -(-max(lengths[i] for i in group) // 8) * 8
        assert len(group) * width <= 64
    assert groups[0] == [0]  # 40 -> width 40: a second row would need 80 tokens


def test_spread_to_count_splits_the_fullest_groups_then_adds_fillers():
    lengths = [10, 9, 8, 1]
    spread = spread_to_count([[0, 1, 2], [3]], lengths, 3)
    assert sorted(map(sorted, spread)) == [[0, 2], [1], [3]]  # [10, 9, 8] split into [10, 8], [9]
    spread = spread_to_count([[0, 1]], lengths, 4)
    assert sorted(map(sorted, spread)) == [[], [], [0], [1]]


@pytest.mark.parametrize("mode", [PACKING, PACKING_FFD, DYNAMIC], ids=["mffd", "ffd", "dynamic"])
def test_every_target_token_lands_in_exactly_one_micro_batch(mode):
    batch = _mixed_batch()
    micro_batches = token_budget_micro_batches(batch, _train_plan(**mode), max_over_ranks=_same_count)
    assert sum(count_valid_tokens(mb) for mb in micro_batches) == count_valid_tokens(batch)
    # the (context token, target token) pairs are the same multiset
    def pairs(b):
        mask = target_mask(b) != 0
        return sorted(zip(b["input_ids"][:, :-1][mask].tolist(), b["input_ids"][:, 1:][mask].tolist()))
    assert sorted(p for mb in micro_batches for p in pairs(mb)) == pairs(batch)
    budget = (mode.get("sequence_packing") or mode.get("dynamic_batching"))["train_mb_tokens"]
    for mb in micro_batches:
        assert mb["input_ids"].numel() <= budget
    if "sequence_packing" in mode:
        assert all(mb["input_ids"].shape[0] == 1 for mb in micro_batches)
        assert sum(int(mb["num_samples"].sum()) for mb in micro_batches) == 6  # rows 5 and 6 left out


def test_more_micro_batches_than_samples_adds_fillers_that_carry_no_loss():
    batch = _mixed_batch()
    micro_batches = token_budget_micro_batches(batch, _train_plan(**PACKING), max_over_ranks=lambda n: 9)
    assert len(micro_batches) == 9
    fillers = [mb for mb in micro_batches if count_valid_tokens(mb) == 0]
    assert len(fillers) == 3  # 6 samples with targets, one per micro-batch, then fillers
    assert all("position_ids" in mb for mb in micro_batches)


# ---------------------------------------------------------------- one plan per call


def _real_tokens(mb: BatchedDataDict) -> int:
    return int((mb["input_ids"] != 0).sum())


def test_largest_first_runs_the_packers_rows_fullest_first():
    batch = _mixed_batch()
    packer = token_budget_micro_batches(batch, _train_plan(**PACKING), max_over_ranks=lambda n: n + 1)
    largest = token_budget_micro_batches(batch, _train_plan(**PACKING_LARGEST_FIRST), max_over_ranks=lambda n: n + 1)
    packer_tokens = [_real_tokens(mb) for mb in packer]
    assert packer_tokens != sorted(packer_tokens, reverse=True)  # the case is not already ordered
    assert [_real_tokens(mb) for mb in largest] == sorted(packer_tokens, reverse=True)
    # the same rows, reordered
    assert sorted(mb["input_ids"].tolist() for mb in largest) == sorted(mb["input_ids"].tolist() for mb in packer)


def test_training_plan_reads_the_policy_section():
    assert _train_plan(train_micro_batch_size=2) == MicroBatchPlan(2, length_multiple=1)
    assert _train_plan(**PACKING) == MicroBatchPlan(1, length_multiple=8, token_budget=48, packing_algorithm="modified_first_fit_decreasing")
    assert _train_plan(**DYNAMIC) == MicroBatchPlan(1, length_multiple=8, token_budget=64)
    # unset train_mb_tokens: max_total_sequence_length x train_micro_batch_size
    unset = {"sequence_packing": {"enabled": True, "sequence_length_round": 8}}
    assert _train_plan(train_micro_batch_size=2, **unset).token_budget == 2 * SEQ


@pytest.mark.parametrize("mode", [{}, PACKING, DYNAMIC], ids=["padded", "packing", "dynamic"])
def test_validation_honours_its_own_micro_batch_size(mode):
    """sft.val_micro_batch_size decides validation's micro-batches under every batching mode,
    whatever the training settings are."""
    cfg, batch = _cfg(**mode), _mixed_batch()
    train_mbs = split_micro_batches(batch, MicroBatchPlan.for_training(cfg), max_over_ranks=_same_count)
    val_mbs = split_micro_batches(batch, MicroBatchPlan.for_validation(cfg, 4), max_over_ranks=_same_count)
    assert len(val_mbs) < len(train_mbs)
    if not mode:
        assert [mb["input_ids"].shape[0] for mb in val_mbs] == [4, 4]
    else:
        assert all(mb["input_ids"].numel() <= 4 * SEQ for mb in val_mbs)
        assert max(mb["input_ids"].numel() for mb in val_mbs) > 64  # more than training's budget
    assert sum(count_valid_tokens(mb) for mb in val_mbs) == count_valid_tokens(batch)


# ---------------------------------------------------------------- on a model


@pytest.fixture(scope="module")
def model():
    return tiny_llama().eval()


def _loss_and_grads(model, micro_batches, global_tokens, *, chunked: bool):
    model.zero_grad()
    total = 0.0
    for mb in micro_batches:
        if chunked:
            loss, _ = NLLLoss().from_hidden_states(forward_hidden_states(model, mb), model.lm_head, mb, global_tokens)
        else:
            loss, _ = NLLLoss()(forward_logits(model, mb), mb, global_tokens)
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked"])
@pytest.mark.parametrize(
    "mode", [PACKING, PACKING_FFD, PACKING_LARGEST_FIRST, DYNAMIC], ids=["mffd", "ffd", "largest_first", "dynamic"]
)
def test_packed_and_dynamic_micro_batches_give_the_plain_loss_and_gradients(model, mode, chunked):
    batch = _mixed_batch(1)
    global_tokens = count_valid_tokens(batch)
    want_loss, want_grads = _loss_and_grads(model, batch.micro_batches(2), global_tokens, chunked=False)
    micro_batches = token_budget_micro_batches(batch, _train_plan(**mode), max_over_ranks=_same_count)
    if "sequence_packing" in mode:  # samples of very different lengths share a row
        assert max(int(mb["num_samples"].max()) for mb in micro_batches) >= 3
    got_loss, got_grads = _loss_and_grads(model, micro_batches, global_tokens, chunked=chunked)
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
