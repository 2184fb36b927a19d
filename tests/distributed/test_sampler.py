"""The sharded loader: N ranks' slices of each global batch are the single-process loader's batch."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from graspext.distributed import ShardedSampler, shard_loader


def _data(n):
    return TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.long))


def _batches(loader, seed):
    loader.generator.manual_seed(seed) if loader.generator is not None else None
    return [x.tolist() for x, _ in loader]


@pytest.mark.parametrize("n,batch,world", [(64, 16, 2), (70, 12, 3), (10, 4, 4), (33, 8, 2)])
def test_shards_rebuild_the_single_process_batches(n, batch, world):
    single = DataLoader(_data(n), batch_size=batch, shuffle=True, generator=torch.Generator())
    expected = _batches(single, seed=5)
    shards = [_batches(shard_loader(single, r, world, train=True), seed=5) for r in range(world)]
    full = n // batch  # training drops a trailing partial global batch: every rank takes the same steps
    assert all(len(s) == full for s in shards)
    for i in range(full):
        assert [x for s in shards for x in s[i]] == expected[i]


@pytest.mark.parametrize("n,batch,world", [(33, 8, 2), (10, 4, 4), (5, 4, 4)])
def test_evaluation_shards_cover_every_example_once(n, batch, world):
    loader = DataLoader(_data(n), batch_size=batch)
    seen = sorted(i for r in range(world) for b in _batches(shard_loader(loader, r, world, train=False), 0) for i in b)
    assert seen == list(range(n))
    lengths = [len(ShardedSampler(n, batch, r, world, shuffle=False, drop_last=False)) for r in range(world)]
    assert sum(lengths) == n


def test_sampler_without_generator_follows_set_epoch():
    s = ShardedSampler(20, 4, 0, 2, shuffle=True, drop_last=True, seed=3)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first


def test_bad_loaders_are_refused():
    data = _data(16)
    with pytest.raises(ValueError, match=r"batch_size \(the global batch\) = 10 is not divisible by the 4 processes"):
        shard_loader(DataLoader(data, batch_size=10), 0, 4, train=True)
    with pytest.raises(ValueError, match="needs generator=torch.Generator"):
        shard_loader(DataLoader(data, batch_size=4, shuffle=True), 0, 2, train=True)
    with pytest.raises(TypeError, match="must be torch DataLoaders"):
        shard_loader([(torch.zeros(2), torch.zeros(2))], 0, 2, train=True)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(data), 4, False)
    with pytest.raises(ValueError, match="batch_sampler cannot be sharded"):
        shard_loader(DataLoader(data, batch_sampler=sampler), 0, 2, train=True)
    with pytest.raises(ValueError, match="rank must be in"):
        ShardedSampler(16, 4, 2, 2, shuffle=False, drop_last=False)
