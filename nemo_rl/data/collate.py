"""DatumSpecs -> one right-padded BatchedDataDict.

Use with a DataLoader through functools.partial (picklable for worker processes):

    collate_fn = functools.partial(sft_collate, pad_token_id=tokenizer.pad_token_id,
                                   make_sequence_length_divisible_by=cfg.policy.make_sequence_length_divisible_by)
"""

from __future__ import annotations

import torch

from nemo_rl.data.batched_data_dict import BatchedDataDict
from nemo_rl.data.interfaces import DatumSpec


def sft_collate(
    datums: list[DatumSpec], *, pad_token_id: int, make_sequence_length_divisible_by: int = 1
) -> BatchedDataDict:
    """input_ids (B, T) int64 right-padded with pad_token_id, input_lengths (B,) int64, token_mask
    (B, T) float32 (0 on padding), sample_mask (B,) float32 (the loss multipliers), idx (list).

    T is the longest length rounded up to a multiple of make_sequence_length_divisible_by.
    """
    if not datums:
        raise ValueError("sft_collate got an empty batch")
    if make_sequence_length_divisible_by < 1:
        raise ValueError(
            f"make_sequence_length_divisible_by must be >= 1, got {make_sequence_length_divisible_by}"
        )
    lengths_B = torch.tensor([len(d["input_ids"]) for d in datums], dtype=torch.int64)
    width = int(lengths_B.max())
    width = -(-width // make_sequence_length_divisible_by) * make_sequence_length_divisible_by
    input_ids_BT = torch.full((len(datums), width), pad_token_id, dtype=torch.int64)
    token_mask_BT = torch.zeros((len(datums), width), dtype=torch.float32)
    for row, datum in enumerate(datums):
        length = len(datum["input_ids"])
        input_ids_BT[row, :length] = torch.as_tensor(datum["input_ids"], dtype=torch.int64)
        token_mask_BT[row, :length] = torch.as_tensor(datum["token_mask"], dtype=torch.float32)
    return BatchedDataDict(
        input_ids=input_ids_BT,
        input_lengths=lengths_B,
        token_mask=token_mask_BT,
        sample_mask=torch.tensor([float(d["loss_multiplier"]) for d in datums], dtype=torch.float32),
        idx=[d["idx"] for d in datums],
    )
