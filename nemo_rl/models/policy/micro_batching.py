"""How one rank's local batch becomes micro-batches: fixed rows, dynamic batching or packing.

Shape legend: B batch (samples), T time (tokens).

The caller decides how, in one `MicroBatchPlan` per call: training uses the `policy` section's
settings (`MicroBatchPlan.for_training`), validation its own micro-batch size
(`MicroBatchPlan.for_validation`), so nothing on the worker reads a micro-batch setting from
anywhere else.

  fixed rows         `micro_batch_size` rows at a time, each micro-batch's right padding past its
                     longest row trimmed (to a multiple of `make_sequence_length_divisible_by`).

Token-budget micro-batches (dynamic batching and packing) both run on the worker, after the driver has split the global batch over the data-parallel
ranks, and both only regroup samples: every sample that carries loss lands in exactly one
micro-batch, and the loss of each is still divided by the global count of valid tokens.
So the loss and the update equal those of plain fixed-size micro-batches.

  dynamic batching   rows sorted by length, grouped while rows x (longest length rounded up
                     to `sequence_length_round`) <= `train_mb_tokens`; padded per micro-batch.
  sequence packing   samples bin-packed (`algorithm`) into rows of <= `train_mb_tokens`
                     tokens, one packed row per micro-batch (`data.packing.pack_rows`).

Samples with no target token (sample_mask 0, or an all-masked sample, or the driver's filler
rows) contribute nothing to the loss or the gradient, so they are left out.

FSDP runs collectives in every forward and backward, so all ranks must run the same number
of micro-batches: the largest count over the ranks is agreed (`max_over_ranks`), and a rank
with fewer splits its fullest micro-batches, or, when it has no more samples to spread,
adds filler micro-batches that carry no loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nemo_rl.config.schema import PolicyConfig
from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.data.packing import PACKING_ALGORITHMS, Bins, pack_rows, round_up
from nemo_rl.data.targets import target_mask


@dataclass(frozen=True)
class MicroBatchPlan:
    """How a worker call splits its rows: `micro_batch_size` rows at a time, or, when
    `token_budget` is set, groups of at most that many tokens (packed into one row each when
    `packing_algorithm` is set, else padded: dynamic batching). Lengths are rounded up to a
    multiple of `length_multiple`."""

    micro_batch_size: int
    length_multiple: int = 1
    token_budget: int | None = None
    packing_algorithm: str | None = None
    # policy.sequence_packing.microbatch_order: "largest_first" runs the fullest packed row first
    largest_first: bool = False

    @classmethod
    def for_training(cls, cfg: PolicyConfig) -> MicroBatchPlan:
        """`policy.train_micro_batch_size`, or the enabled token-budget section's train_mb_tokens
        (unset: NeMo RL's default, max_total_sequence_length x train_micro_batch_size)."""
        return cls._from_policy(cfg, cfg.train_micro_batch_size, _train_mb_tokens(cfg))

    @classmethod
    def for_validation(cls, cfg: PolicyConfig, micro_batch_size: int) -> MicroBatchPlan:
        """`micro_batch_size` rows (sft.val_micro_batch_size); under a token budget, the tokens of
        that many sequences of the longest allowed length (max_total_sequence_length)."""
        return cls._from_policy(cfg, micro_batch_size, cfg.max_total_sequence_length * micro_batch_size)

    @classmethod
    def _from_policy(cls, cfg: PolicyConfig, micro_batch_size: int, budget: int) -> MicroBatchPlan:
        section = _token_budget_section(cfg)
        if section is None:
            return cls(micro_batch_size, length_multiple=cfg.make_sequence_length_divisible_by)
        return cls(
            micro_batch_size,
            length_multiple=math.lcm(section.sequence_length_round, cfg.make_sequence_length_divisible_by),
            token_budget=budget,
            packing_algorithm=cfg.sequence_packing.algorithm if cfg.sequence_packing.enabled else None,
            largest_first=cfg.sequence_packing.enabled and cfg.sequence_packing.microbatch_order == "largest_first",
        )


def _token_budget_section(cfg: PolicyConfig):
    if cfg.sequence_packing.enabled:
        return cfg.sequence_packing
    if cfg.dynamic_batching.enabled:
        return cfg.dynamic_batching
    return None


def _train_mb_tokens(cfg: PolicyConfig) -> int:
    section = _token_budget_section(cfg)
    configured = section.train_mb_tokens if section is not None else None
    return configured or cfg.max_total_sequence_length * cfg.train_micro_batch_size


def micro_batches(
    batch: BatchedDataDict, plan: MicroBatchPlan, *, max_over_ranks: Callable[[int], int]
) -> list[BatchedDataDict]:
    """This rank's micro-batches of `batch` per `plan`; `max_over_ranks(n)` returns the largest n
    over the ranks (token-budget plans must agree on a count, see the module docstring)."""
    if plan.token_budget is not None:
        return token_budget_micro_batches(batch, plan, max_over_ranks=max_over_ranks)
    return [trim_right_padding(mb, plan.length_multiple) for mb in batch.micro_batches(plan.micro_batch_size)]


def trim_right_padding(mb: BatchedDataDict, multiple: int) -> BatchedDataDict:
    """Drops the time steps past the micro-batch's longest sequence (all right padding),
    keeping the length a multiple of `multiple`. Exact: causal attention never looks right."""
    width = mb["input_ids"].shape[1]
    longest = int(mb["input_lengths"].max().item()) if len(mb["input_lengths"]) else width
    keep = min(width, max(2, round_up(longest, multiple)))
    if keep == width:
        return mb
    return BatchedDataDict(
        {k: v[:, :keep] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v for k, v in mb.items()}
    )


def dynamic_batch_groups(lengths: list[int], budget: int, multiple: int) -> Bins:
    """Longest first; a group grows while rows x its padded width stays within `budget`
    (a row that alone exceeds it forms a group of its own)."""
    groups: Bins = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if groups and (len(groups[-1]) + 1) * round_up(lengths[groups[-1][0]], multiple) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def spread_to_count(groups: Bins, lengths: list[int], count: int) -> Bins:
    """`count` groups: split the group with the most tokens (of those with two or more samples)
    into two balanced halves until there are enough, then add empty groups (fillers).
    A subset of a group that fits the budget fits it too."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [g for g in groups if len(g) > 1]
        if not splittable:
            groups += [[] for _ in range(count - len(groups))]
            break
        fullest = max(splittable, key=lambda g: sum(lengths[i] for i in g))
        groups.remove(fullest)
        by_length = sorted(fullest, key=lambda i: -lengths[i])
        groups += [by_length[0::2], by_length[1::2]]
    return groups


def _filler(batch: BatchedDataDict, multiple: int, packed: bool) -> BatchedDataDict:
    """One row of padding that carries no loss."""
    width = round_up(2, multiple)
    mb = BatchedDataDict(
        input_ids=torch.zeros((1, width), dtype=batch["input_ids"].dtype),
        input_lengths=torch.zeros(1, dtype=torch.int64),
        token_mask=torch.zeros((1, width), dtype=torch.float32),
        sample_mask=torch.zeros(1, dtype=torch.float32),
    )
    if packed:
        mb["position_ids"] = torch.arange(width)[None]
    return mb


def _padded_rows(batch: BatchedDataDict, group: list[int], multiple: int) -> BatchedDataDict:
    mb = batch.select(group)
    width = min(mb["input_ids"].shape[1], round_up(max(int(mb["input_lengths"].max()), 2), multiple))
    T = mb["input_ids"].shape[1]
    return BatchedDataDict(
        {k: v[:, :width] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == T else v for k, v in mb.items()}
    )


def token_budget_micro_batches(
    batch: BatchedDataDict, plan: MicroBatchPlan, *, max_over_ranks: Callable[[int], int]
) -> list[BatchedDataDict]:
    """Packed (`plan.packing_algorithm` set) or dynamically batched micro-batches of at most
    `plan.token_budget` tokens; `max_over_ranks(n)` returns the largest n over the ranks."""
    budget, multiple = plan.token_budget, plan.length_multiple
    has_targets_B = target_mask(batch).sum(dim=1) > 0
    kept = has_targets_B.nonzero().flatten().tolist()
    lengths = [int(n) for n in batch["input_lengths"][kept].tolist()]
    packed = plan.packing_algorithm is not None
    if packed:
        groups = PACKING_ALGORITHMS[plan.packing_algorithm](lengths, budget)
    else:
        groups = dynamic_batch_groups(lengths, budget, multiple)
    groups = spread_to_count(groups, lengths, max_over_ranks(max(1, len(groups))))
    if plan.largest_first:  # stable: equal rows keep the packer's order; fillers (0 tokens) go last
        groups = sorted(groups, key=lambda group: -sum(lengths[i] for i in group))
    micro_batches = []
    for group in groups:
        rows = [kept[i] for i in group]
        if not rows:
            micro_batches.append(_filler(batch, multiple, packed))
        elif packed:
            micro_batches.append(pack_rows(batch, [rows], multiple=multiple))
        else:
            micro_batches.append(_padded_rows(batch, rows, multiple))
    return micro_batches
