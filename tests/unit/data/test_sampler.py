"""EpochSampler: the order of epoch e depends on (seed, e) only, and a resumed loader continues it."""

from __future__ import annotations

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from nemo_rl.data.sampler import EpochSampler


def test_each_epoch_is_a_seeded_permutation_independent_of_history():
    sampler = EpochSampler(10, seed=5)
    for epoch in (0, 1, 2):
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        assert sampler.order(epoch) == expected
    assert sampler.order(0) != sampler.order(1)
    fresh = EpochSampler(10, seed=5)
    fresh.set_epoch(2)
    sampler.set_epoch(2)
    assert list(fresh) == list(sampler)


def test_no_shuffle_visits_in_order():
    assert list(EpochSampler(4, seed=1, shuffle=False)) == [0, 1, 2, 3]


def _loader(sampler):
    return StatefulDataLoader(list(range(12)), batch_size=3, sampler=sampler, drop_last=True)


def test_a_loader_restored_mid_epoch_yields_the_rest_then_the_same_next_epoch():
    sampler = EpochSampler(12, seed=3)
    loader = _loader(sampler)
    uninterrupted = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        uninterrupted += [b.tolist() for b in loader]

    sampler = EpochSampler(12, seed=3)
    loader = _loader(sampler)
    iterator = iter(loader)
    seen = [next(iterator).tolist(), next(iterator).tolist()]
    state = loader.state_dict()

    sampler = EpochSampler(12, seed=3)
    resumed = _loader(sampler)
    resumed.load_state_dict(state)
    sampler.set_epoch(0)
    seen += [b.tolist() for b in resumed]
    sampler.set_epoch(1)
    seen += [b.tolist() for b in resumed]
    assert seen == uninterrupted
