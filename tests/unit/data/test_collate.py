"""sft_collate: right padding, divisibility, masks and dtypes."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch

from nemo_rl.data.collate import sft_collate
from nemo_rl.data.interfaces import DatumSpec

PAD = 7


def datum(ids, mask, idx, loss_multiplier=1.0) -> DatumSpec:
    return DatumSpec(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        token_mask=torch.tensor(mask, dtype=torch.int64),
        length=len(ids),
        loss_multiplier=loss_multiplier,
        idx=idx,
        task_name="t",
        overlength=None,
    )


BATCH = [datum([1, 2, 3], [0, 1, 1], idx=4), datum([1, 5], [0, 1], idx=9, loss_multiplier=0.0)]


def test_right_padding_masks_and_dtypes():
    batch = sft_collate(BATCH, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 5, PAD]]
    assert batch["input_lengths"].tolist() == [3, 2]
    assert batch["token_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    assert batch["sample_mask"].tolist() == [1.0, 0.0]
    assert batch["idx"] == [4, 9]
    assert batch["input_ids"].dtype == torch.int64 and batch["input_lengths"].dtype == torch.int64
    assert batch["token_mask"].dtype == torch.float32 and batch["sample_mask"].dtype == torch.float32
    assert batch.size == 2


@pytest.mark.parametrize(("divisor", "width"), [(1, 3), (2, 4), (4, 4), (8, 8), (3, 3)])
def test_sequence_length_divisible_by(divisor, width):
    batch = sft_collate(BATCH, pad_token_id=PAD, make_sequence_length_divisible_by=divisor)
    assert batch["input_ids"].shape == (2, width) and batch["token_mask"].shape == (2, width)
    assert (batch["input_ids"][0, 3:] == PAD).all() and (batch["token_mask"][:, 3:] == 0).all()


def test_partial_is_picklable_for_dataloader_workers():
    collate = functools.partial(sft_collate, pad_token_id=PAD, make_sequence_length_divisible_by=4)
    restored = pickle.loads(pickle.dumps(collate))
    loader = torch.utils.data.DataLoader(BATCH, batch_size=2, collate_fn=restored)
    assert next(iter(loader))["input_ids"].shape == (2, 4)


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        sft_collate([], pad_token_id=PAD)
