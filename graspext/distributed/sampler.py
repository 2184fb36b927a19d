"""Sharding a DataLoader over the ranks so that N processes see exactly the single-process run's batches.

The batch size of the loader a user hands the trainer is the **global** batch. With N processes each rank
computes ``batch_size / N`` examples of every global batch: rank r takes the r-th contiguous slice of it. The
order of the global batches is the single-process loader's own: the same ``torch.randperm`` drawn from the
same generator (the trainer seeds it per epoch from (seed, epoch)). DDP averages the ranks' gradients, so a
step is the single-process step on the whole global batch, at the same learning rate.

Training drops a trailing partial global batch under DDP, so every rank takes the same number of steps;
evaluation keeps every example (ranks may hold unequal shares; the metrics are sums).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler


class ShardedSampler(Sampler[int]):
    """Indices of this rank's share of each global batch; see the module docstring.

    ``generator`` (shuffled order only) is the generator the permutation is drawn from; without one the
    sampler seeds its own from ``seed`` and the epoch given to :meth:`set_epoch`, as torch's DistributedSampler.
    """

    def __init__(self, num_examples: int, global_batch_size: int, rank: int, world_size: int, *, shuffle: bool,
                 drop_last: bool, seed: int = 0, generator: torch.Generator | None = None):
        if global_batch_size % world_size:
            raise ValueError(f"batch_size (the global batch) = {global_batch_size} is not divisible by the "
                             f"{world_size} processes; use a multiple of {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_examples, self.global_batch_size = num_examples, global_batch_size
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.generator = generator
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        gen = self.generator
        if gen is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_examples, generator=gen).tolist()

    def _batches(self) -> int:
        full, rest = divmod(self.num_examples, self.global_batch_size)
        return full + (0 if self.drop_last or not rest else 1)

    def _share(self, batch_length: int) -> tuple[int, int]:
        """This rank's slice [start, stop) of a global batch of ``batch_length`` examples: the r-th local batch
        of a full one, as even a split as the count allows of the trailing partial one (evaluation)."""
        if batch_length == self.global_batch_size:
            b = self.local_batch_size
            return self.rank * b, (self.rank + 1) * b
        share, extra = divmod(batch_length, self.world_size)
        start = self.rank * share + min(self.rank, extra)
        return start, start + share + (self.rank < extra)

    def _batch_lengths(self):
        for i in range(self._batches()):
            yield min(self.global_batch_size, self.num_examples - i * self.global_batch_size)

    def __iter__(self):
        order = self._order()
        for i, length in enumerate(self._batch_lengths()):
            start, stop = self._share(length)
            offset = i * self.global_batch_size
            yield from order[offset + start:offset + stop]

    def __len__(self) -> int:
        return sum(stop - start for start, stop in map(self._share, self._batch_lengths()))


def shard_loader(loader: DataLoader, rank: int, world_size: int, *, train: bool) -> DataLoader:
    """A DataLoader over ``loader``'s dataset giving rank ``rank`` its share of every global batch.

    Keeps the loader's collate function, workers and generator (the trainer reseeds the generator per epoch,
    so the shuffled order is the single-process run's). Only a plain DataLoader with a shuffled or sequential
    sampler and an integer batch size can be sharded exactly; anything else is refused.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"under torch.distributed the trainer shards the data itself, so train_loader and "
                        f"test_loader must be torch DataLoaders, got {type(loader).__name__}")
    name = "train_loader" if train else "test_loader"
    if loader.batch_size is None:
        raise ValueError(f"{name}: a DataLoader with a batch_sampler cannot be sharded; give it a batch_size "
                         "(the global batch) and shuffle=True/False")
    if isinstance(loader.sampler, RandomSampler):
        if loader.sampler.replacement or loader.sampler.num_samples != len(loader.dataset):
            raise ValueError(f"{name}: a RandomSampler with replacement or num_samples cannot be sharded")
        shuffle = True
    elif isinstance(loader.sampler, SequentialSampler):
        shuffle = False
    else:
        raise ValueError(f"{name}: its sampler is {type(loader.sampler).__name__}; under torch.distributed the "
                         "trainer shards a DataLoader built with shuffle=True or shuffle=False")
    generator = loader.generator
    if shuffle and generator is None:
        # The single-process RandomSampler would draw from the global RNG, which differs between ranks.
        raise ValueError(f"{name}: a shuffled loader needs generator=torch.Generator() under torch.distributed, "
                         "so that every rank draws the same order (the trainer seeds it per epoch)")
    if loader.batch_size % world_size:
        raise ValueError(f"{name}: batch_size (the global batch) = {loader.batch_size} is not divisible by the "
                         f"{world_size} processes; use a multiple of {world_size}")
    drop_last = train or loader.drop_last
    sampler = ShardedSampler(len(loader.dataset), loader.batch_size, rank, world_size, shuffle=shuffle,
                             drop_last=drop_last, generator=generator)
    return DataLoader(loader.dataset, batch_size=loader.batch_size // world_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=False, generator=generator, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers if loader.num_workers else False)
