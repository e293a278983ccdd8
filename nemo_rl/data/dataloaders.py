"""The SFT data loaders: formatted rows -> tokenized datasets -> padded global batches.

    tokenization = TokenizationOptions.from_config(cfg)
    loaders = build_dataloaders(load_datasets(cfg.data), tokenizer, tokenization, cfg.data, cfg.sft, cfg.policy)
    loaders.train.sampler.set_epoch(epoch)   # before each pass, also after a resume (sampler.py)

The train loader yields `policy.train_global_batch_size` samples per step in the order of
`EpochSampler` (a function of `sft.seed` and the epoch alone); the incomplete last batch of an
epoch is dropped, so every step updates on a full global batch. The validation loader keeps the
rows' order and every sample.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from nemo_rl.config.schema import DataConfig, PolicyConfig, SFTConfig
from nemo_rl.data.collate import sft_collate
from nemo_rl.data.datasets import SFTDatasets
from nemo_rl.data.processors import SFTDataset, TokenizationOptions
from nemo_rl.data.sampler import EpochSampler


@dataclass
class SFTDataLoaders:
    train: StatefulDataLoader  # over an SFTDataset: len(train.dataset) samples
    validation: StatefulDataLoader | None
    overlength_counts: dict[str, dict[str, int]]  # per split ("train", "validation"): SFTDataset.overlength_counts


def build_dataloaders(
    datasets: SFTDatasets,
    tokenizer,
    tokenization: TokenizationOptions,
    data: DataConfig,
    sft: SFTConfig,
    policy: PolicyConfig,
) -> SFTDataLoaders:
    """Tokenized train (and validation) sets and their loaders, all samples processed up front.

    Reads data.shuffle, data.num_workers, sft.seed, sft.val_global_batch_size,
    policy.train_global_batch_size and policy.make_sequence_length_divisible_by.
    """
    train_dataset = SFTDataset(datasets.train, tokenizer, datasets.task_spec, tokenization, source="train")
    val_dataset = None
    if datasets.validation is not None:
        val_task_spec = datasets.validation_task_spec or datasets.task_spec
        val_dataset = SFTDataset(datasets.validation, tokenizer, val_task_spec, tokenization, source="validation")
    overlength_counts = {"train": train_dataset.overlength_counts}
    if val_dataset is not None:
        overlength_counts["validation"] = val_dataset.overlength_counts

    collate = partial(
        sft_collate,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        make_sequence_length_divisible_by=policy.make_sequence_length_divisible_by,
    )
    train_dataloader = _train_dataloader(
        train_dataset,
        collate,
        batch_size=policy.train_global_batch_size,
        seed=sft.seed,
        shuffle=data.shuffle,
        num_workers=data.num_workers,
    )
    val_dataloader = None
    if val_dataset is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            val_dataloader = StatefulDataLoader(
                val_dataset, batch_size=sft.val_global_batch_size, shuffle=False, collate_fn=collate
            )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"the training set has {len(train_dataset)} samples, fewer than one global batch "
            f"(policy.train_global_batch_size={policy.train_global_batch_size})"
        )
    return SFTDataLoaders(train_dataloader, val_dataloader, overlength_counts)


def _train_dataloader(
    dataset: SFTDataset, collate, *, batch_size: int, seed: int, shuffle: bool, num_workers: int
) -> StatefulDataLoader:
    generator = torch.Generator()  # seeds the loader's worker processes
    generator.manual_seed(seed)
    with warnings.catch_warnings():  # torchdata calls a torch API it deprecated itself
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSampler(len(dataset), seed=seed, shuffle=shuffle),
            generator=generator,
            collate_fn=collate,
            drop_last=True,  # every step sees a full global batch, so the update size is fixed
            num_workers=num_workers,
        )
