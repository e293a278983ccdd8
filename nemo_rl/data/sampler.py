"""The order in which a training run visits its samples: a function of (seed, epoch) alone.

    sampler = EpochSampler(len(dataset), seed=cfg.sft.seed, shuffle=cfg.data.shuffle)
    loader = StatefulDataLoader(dataset, batch_size=..., sampler=sampler, drop_last=True)
    sampler.set_epoch(epoch)   # before each pass over `loader`, also after a resume

Epoch e visits `torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`
(or 0..n-1 without shuffling), like `DistributedSampler.set_epoch`. Nothing carries over
from one epoch to the next, so a resumed run needs only the epoch (the driver's
`training_info.json`) and how far into it the loader got (its `state_dict()`, which then
fast-forwards over indices, never over data).

Why not `shuffle=True` with a seeded generator: that generator advances with every epoch
and every iterator the loader makes, and StatefulDataLoader's state restores it to the
start of the interrupted epoch only; with torchdata 0.11 and `num_workers=0`, every epoch
after the resumed one was shuffled differently from the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, num_samples: int, *, seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Which pass the next `iter()` makes (0-based)."""
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The sample indices of `epoch`, in visiting order."""
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return self.num_samples
