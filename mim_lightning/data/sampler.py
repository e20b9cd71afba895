"""A sampler that shards by rank and tells each sample its epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochIndexSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` keys: a seeded permutation per epoch, split across ranks.

    Like ``DistributedSampler`` (the list is padded by wrapping so every rank gets the same number of
    keys), but each key carries the epoch so the dataset can seed crops and masks per sample without
    relying on worker RNG state. Lightning calls :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.length = int(length)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.length // self.world_size)

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = len(self) * self.world_size
        while len(order) < total:
            order += order[: total - len(order)]
        return order[self.rank: total: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(index, epoch) for index in self.indices()])
