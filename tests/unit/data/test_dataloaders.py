"""build_dataloaders: full global batches in each epoch's seeded order, validation in row order."""

from __future__ import annotations

import pytest
import torch

from nemo_rl.config.schema import DataConfig, DatasetConfig, SFTConfig
from nemo_rl.data.dataloaders import build_dataloaders
from nemo_rl.data.datasets import SFTDatasets
from nemo_rl.data.interfaces import TaskDataSpec
from tests.unit.data.data_test_utils import tiny_policy_section, tokenization


def rows(n: int, *, long_from: int | None = None) -> list[dict]:
    """n one-turn chats, row i answering "answer i"; rows from `long_from` on have a long prompt."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {i}" + (" word" * 80 if long_from is not None and i >= long_from else "")},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(n)
    ]


def sections(*, batch_size: int = 4, val_batch_size: int = 3, seed: int = 11, shuffle: bool = True, divisible_by: int = 1):
    data = DataConfig(max_input_seq_length=64, shuffle=shuffle, num_workers=0, train=DatasetConfig())
    sft = SFTConfig(max_num_steps=1, seed=seed, val_global_batch_size=val_batch_size)
    policy = tiny_policy_section(train_global_batch_size=batch_size, make_sequence_length_divisible_by=divisible_by)
    return data, sft, policy


def epochs_of_indices(loader, epochs: int) -> list[list[list[int]]]:
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.append([batch["idx"] for batch in loader])
    return out


def test_train_batches_follow_the_seeded_epoch_order_and_drop_the_incomplete_last(tokenizer):
    spec = TaskDataSpec("t")
    loaders = build_dataloaders(SFTDatasets(rows(11), None, spec), tokenizer, tokenization(), *sections(seed=11))
    expected = []
    for epoch in range(2):
        order = torch.randperm(11, generator=torch.Generator().manual_seed(11 + epoch)).tolist()
        expected.append([order[0:4], order[4:8]])  # the last 3 samples of the epoch make no full batch
    assert epochs_of_indices(loaders.train, 2) == expected
    assert loaders.validation is None and loaders.overlength_counts == {
        "train": {"truncated": 0, "masked": 0, "dropped": 0}
    }

    unshuffled = build_dataloaders(
        SFTDatasets(rows(11), None, spec), tokenizer, tokenization(), *sections(shuffle=False)
    )
    assert epochs_of_indices(unshuffled.train, 2) == [[[0, 1, 2, 3], [4, 5, 6, 7]]] * 2


def test_batches_hold_the_tokenized_rows_padded_to_the_multiple(tokenizer):
    dataset_rows = rows(8)
    loaders = build_dataloaders(
        SFTDatasets(dataset_rows, None, TaskDataSpec("t")), tokenizer, tokenization(), *sections(divisible_by=8)
    )
    batch = next(iter(loaders.train))
    assert batch["input_ids"].shape[1] % 8 == 0
    for row, idx in enumerate(batch["idx"]):
        length = int(batch["input_lengths"][row])
        learned = batch["input_ids"][row, :length][batch["token_mask"][row, :length].bool()]
        # The assistant's header, its answer, end of turn and EOS carry loss (chat-templates.md).
        assert tokenizer.decode(learned).endswith(f"assistant<|end_header_id|>\n\nanswer {idx}<|eot_id|>" + tokenizer.eos_token)
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()


def test_validation_keeps_every_row_in_order_with_its_own_task_spec(tokenizer, tmp_path):
    (tmp_path / "system.txt").write_text("Be brief.")
    validation_spec = TaskDataSpec("v", system_prompt_file=str(tmp_path / "system.txt"))
    datasets = SFTDatasets(rows(8), rows(7, long_from=5), TaskDataSpec("t"), validation_spec)
    loaders = build_dataloaders(
        datasets, tokenizer, tokenization(max_seq_length=64, overlength="drop"), *sections(val_batch_size=3)
    )
    assert [batch["idx"] for batch in loaders.validation] == [[0, 1, 2], [3, 4]]
    assert loaders.overlength_counts["validation"] == {"truncated": 0, "masked": 0, "dropped": 2}
    first = next(iter(loaders.validation))
    assert "Be brief." in tokenizer.decode(first["input_ids"][0])


def test_fewer_samples_than_one_global_batch_is_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"has 3 samples, fewer than one global batch \(policy.train_global_batch_size=4\)"):
        build_dataloaders(SFTDatasets(rows(3), None, TaskDataSpec("t")), tokenizer, tokenization(), *sections())
