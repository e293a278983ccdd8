"""Which tokens of a collated batch are prediction targets, and how many there are.

Shape legend: B batch, T time (tokens).

Token t is a target when `token_mask[t]` is 1 (an assistant token, see `processors.py`) and its
row's `sample_mask` is not 0. It is predicted from tokens < t, so the targets of a row are its
positions 1..T-1; position 0 has no prediction.
"""

from __future__ import annotations

import torch

from nemo_rl.data.batched_data_dict import BatchedDataDict


def target_mask(batch: BatchedDataDict) -> torch.Tensor:
    """mask_BT1 (B, T-1) float32: 1 where token t+1 is a target predicted from tokens <= t;
    rows with sample_mask 0 contribute nothing."""
    token_mask_BT = batch["token_mask"].to(torch.float32)
    sample_mask_B = batch["sample_mask"].to(torch.float32)
    return token_mask_BT[:, 1:] * sample_mask_B[:, None]


def count_valid_tokens(batch: BatchedDataDict) -> torch.Tensor:
    """Number of target tokens in `batch` that carry loss (a 0-dim float64 tensor: exact
    well past float32's 2**24)."""
    return target_mask(batch).sum(dtype=torch.float64)
