"""Sequence packing: bin-packing algorithms over sample lengths, and packed rows.

Shape legend: B batch (samples), T time (tokens), P packed rows.

A packing is a list of bins, each a list of sample indices whose lengths sum to at most the
capacity. `pack_rows` turns one bin into one row: the samples' tokens concatenated, with

  position_ids  restarting at 0 for every sample, so the model can tell where samples begin
                (Hugging Face models derive a block-diagonal causal mask from them, or the
                flash-attention varlen boundaries; see `models/policy/forward.py`);
  token_mask    each sample's own mask times its sample_mask, and 0 on each sample's first
                token: that token would otherwise be "predicted" from the previous sample.

With these the masked NLL of a packed row is exactly the sum of its samples' NLLs.
Pure CPU code: no torch.distributed, no model.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

from nemo_rl.data.batched_data_dict import BatchedDataDict

Bins = list[list[int]]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check(lengths: Sequence[int], capacity: int) -> None:
    if capacity < 1:
        raise ValueError(f"bin capacity must be >= 1, got {capacity}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"sample {i} has {n} tokens, more than the {capacity} tokens a micro-batch may hold "
            f"({len(too_long)} such samples); raise train_mb_tokens to at least "
            f"{max(n for _, n in too_long)}"
        )
    if any(n < 1 for n in lengths):
        raise ValueError(f"sample lengths must be >= 1, got {min(lengths)}")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> Bins:
    """Longest first, each into the first bin with room, else a new bin (O(n * bins))."""
    _check(lengths, capacity)
    bins: Bins = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= capacity:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def modified_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> Bins:
    """Johnson & Garey's modified FFD (the algorithm NeMo RL defaults to).

    Items are large (> C/2), medium (C/3, C/2], small (C/6, C/3] or tiny (<= C/6).
      1. every large item opens a bin, largest first;
      2. forward over those bins: add the largest medium item that fits;
      3. backward over the bins without a medium item: if the two smallest small items fit,
         add the smallest and then the largest small item that still fits;
      4. forward over all bins: add the largest remaining item that fits, while any fits;
      5. worst-fit decreasing for what is left, into new bins.
    """
    _check(lengths, capacity)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    large = [i for i in order if lengths[i] > capacity / 2]
    medium = [i for i in order if capacity / 3 < lengths[i] <= capacity / 2]
    small = [i for i in reversed(order) if capacity / 6 < lengths[i] <= capacity / 3]  # ascending
    tiny = [i for i in order if lengths[i] <= capacity / 6]

    bins: Bins = [[i] for i in large]
    loads = [lengths[i] for i in large]
    has_medium = [False] * len(bins)

    for b in range(len(bins)):  # 2. medium items are in decreasing order: first fit = largest
        for k, i in enumerate(medium):
            if loads[b] + lengths[i] <= capacity:
                bins[b].append(medium.pop(k))
                loads[b] += lengths[i]
                has_medium[b] = True
                break

    for b in reversed(range(len(bins))):  # 3.
        if has_medium[b] or len(small) < 2:
            continue
        room = capacity - loads[b]
        if lengths[small[0]] + lengths[small[1]] > room:
            continue
        first = small.pop(0)
        room -= lengths[first]
        second = max((k for k, i in enumerate(small) if lengths[i] <= room), default=None)
        bins[b].append(first)
        loads[b] += lengths[first]
        if second is not None:  # always true here: small[0] fit with the one popped
            bins[b].append(small[second])
            loads[b] += lengths[small.pop(second)]

    rest = sorted(medium + small + tiny, key=lambda i: (-lengths[i], i))  # 4.
    for b in range(len(bins)):
        while rest and loads[b] + lengths[rest[-1]] <= capacity:
            k = next(k for k, i in enumerate(rest) if loads[b] + lengths[i] <= capacity)
            loads[b] += lengths[rest[k]]
            bins[b].append(rest.pop(k))

    # 5. The leftovers, largest first, each into the emptiest new bin (worst-fit decreasing:
    # loads kept sorted ascending, so if the emptiest cannot take the item, none can).
    new_bins: Bins = []
    new_loads: list[int] = []
    for i in rest:
        if new_loads and new_loads[0] + lengths[i] <= capacity:
            target, load = new_bins.pop(0), new_loads.pop(0)
        else:
            target, load = [], 0
        target.append(i)
        load += lengths[i]
        at = bisect.bisect(new_loads, load)
        new_loads.insert(at, load)
        new_bins.insert(at, target)
    return bins + new_bins


PACKING_ALGORITHMS: dict[str, Callable[[Sequence[int], int], Bins]] = {
    "first_fit_decreasing": first_fit_decreasing,
    "modified_first_fit_decreasing": modified_first_fit_decreasing,
}


def pack_rows(batch: BatchedDataDict, bins: Bins, *, multiple: int = 1, pad_token_id: int = 0) -> BatchedDataDict:
    """One row per bin: the bin's samples concatenated in bin order, right-padded to the
    longest row rounded up to `multiple`.

    Returns input_ids (P, T), position_ids (P, T), token_mask (P, T) (samples' masks times
    their sample_mask, 0 on each sample's first token and on padding), input_lengths (P,)
    (tokens used), sample_mask (P,) = 1, num_samples (P,). Any other (B, T) tensor of the
    batch is concatenated like input_ids; other per-sample entries have no packed form and
    are dropped.
    """
    lengths_B = batch["input_lengths"].tolist()
    used = [sum(lengths_B[i] for i in b) for b in bins]
    width = round_up(max(max(used, default=1), 2), multiple)
    P, T = len(bins), batch["input_ids"].shape[1]
    per_token = [
        k for k, v in batch.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == T and k not in ("input_ids", "token_mask")
    ]
    input_ids_PT = torch.full((P, width), pad_token_id, dtype=batch["input_ids"].dtype)
    position_ids_PT = torch.zeros((P, width), dtype=torch.int64)
    token_mask_PT = torch.zeros((P, width), dtype=torch.float32)
    extra = {k: torch.zeros((P, width, *batch[k].shape[2:]), dtype=batch[k].dtype) for k in per_token}
    sample_mask_B = batch["sample_mask"].to(torch.float32)
    for row, b in enumerate(bins):
        start = 0
        for i in b:
            n = lengths_B[i]
            span = slice(start, start + n)
            input_ids_PT[row, span] = batch["input_ids"][i, :n]
            position_ids_PT[row, span] = torch.arange(n)
            token_mask_PT[row, span] = batch["token_mask"][i, :n].to(torch.float32) * sample_mask_B[i]
            token_mask_PT[row, start] = 0.0  # not a target: its predecessor is another sample
            for k in per_token:
                extra[k][row, span] = batch[k][i, :n]
            start += n
        # Padding gets its own restarting positions: it is then a separate "sample" that
        # nothing attends to, and it carries no loss.
        position_ids_PT[row, start:] = torch.arange(width - start)
    return BatchedDataDict(
        input_ids=input_ids_PT,
        position_ids=position_ids_PT,
        token_mask=token_mask_PT,
        input_lengths=torch.tensor(used, dtype=torch.int64),
        sample_mask=torch.ones(P, dtype=torch.float32),
        num_samples=torch.tensor([len(b) for b in bins], dtype=torch.int64),
        **extra,
    )
