"""The shared core of stream sources (rows that arrive as an iterable and cannot seek).

A stream source (``streaming = True``) provides:

- ``epoch_size``: samples per epoch over all devices;
- ``rows(rank, world_size, epoch, seed)``: this rank's rows for ``epoch`` (the source splits them over
  ranks and, inside a DataLoader worker, over workers; ``n_shards`` says over how many workers at most);
- ``decode(row) -> (image, label)`` (raises one of ``unreadable`` for a bad row).

:class:`StreamDataset` turns that into items seeded by ``(seed, epoch, index)``, exactly
``epoch_size // (devices x batch)`` batches per device (a worker whose rows run out starts them again),
unreadable rows skipped and counted; :class:`StreamLoader` keeps the epoch and saves the position.
Resume is exact at epoch boundaries; mid-epoch, the epoch's stream is read again from its start for the
batches left (a stream cannot seek).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mim_lightning.data.datasets import transformed_item
from mim_lightning.data.transforms import MIMTransform, as_rgb


class StreamDataset(IterableDataset):
    """Items from a stream source through a :class:`MIMTransform`; ``index`` is the row's position in this
    worker's stream, interleaved over workers and ranks (unique per epoch). Set :attr:`epoch`,
    :attr:`rank`, :attr:`world_size`, :attr:`limit` and :attr:`batch_size` before iterating."""

    def __init__(self, source: Any, transform: MIMTransform, seed: int = 0) -> None:
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.epoch, self.rank, self.world_size, self.limit, self.batch_size = 0, 0, 1, 0, 1
        # Shared with the loader workers: unreadable rows read (a row read again in a later epoch counts
        # again: a stream has no stable row ids), and whether one was warned about (once per run).
        self.bad = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.warned = torch.zeros(1, dtype=torch.bool).share_memory_()

    def num_bad(self) -> int:
        return int(self.bad.sum())

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self.source.rows(self.rank, self.world_size, self.epoch, self.seed)
        # The source deals its shards to the DataLoader workers (workers beyond its shard count get none);
        # this worker's quota, in whole batches, of the batches every rank yields:
        active = max(1, min(workers, int(getattr(stream, "n_shards", workers) or workers)))
        batches = self.limit // self.batch_size
        quota = 0 if worker >= active else (batches // active + (1 if worker < batches % active else 0)) * self.batch_size
        produced = 0
        unreadable = tuple(self.source.unreadable)
        for position, row in enumerate(_cycle(stream) if quota else ()):
            if produced >= quota:
                return
            index = (position * workers + worker) * self.world_size + self.rank
            try:
                image, label = self.source.decode(row)
                image = as_rgb(image)
            except unreadable as exc:
                self.bad += 1
                if not self.warned[0]:
                    self.warned[0] = True
                    warnings.warn(f"skipping unreadable streamed row: {type(exc).__name__}: {exc} (further ones are "
                                  "counted in data/skipped, not reported)", stacklevel=2)
                continue
            produced += 1
            yield transformed_item(self.transform, self.seed, self.epoch, index, image, label)


def _cycle(stream: Any) -> Iterator[Any]:
    """The stream, started over when it ends before the epoch's quota (so every rank fills it)."""
    while True:
        empty = True
        for row in stream:
            empty = False
            yield row
        if empty:
            raise RuntimeError("the streamed dataset gave no rows to this rank/worker")


class StreamLoader(DataLoader):
    """The training loader of a stream source: ``epoch_size // (devices x batch)`` batches per device;
    the position saved is (epoch, batches done), restored at the epoch's start (see the module docstring)."""

    def __init__(self, dataset: StreamDataset, epoch_size: int, rank: int, world_size: int, epoch_fn: Any,
                 progress: Any, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.rank, self.world = rank, world_size
        self.num_batches = int(epoch_size) // world_size // int(self.batch_size)
        self.epoch_fn, self.progress = epoch_fn, progress
        self._resume_epoch: int | None = None
        self._current: int | None = None

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        dataset: StreamDataset = self.dataset
        # A restored epoch wins: Lightning creates a resumed fit's first iterator before its loops
        # report the restored epoch.
        epoch = self._resume_epoch if self._resume_epoch is not None else int(self.epoch_fn())
        self._resume_epoch = None
        self._current = epoch
        dataset.epoch, dataset.rank, dataset.world_size = epoch, self.rank, self.world
        dataset.limit, dataset.batch_size = self.num_batches * self.batch_size, self.batch_size
        return itertools.islice(super().__iter__(), self.num_batches)

    def state_dict(self) -> dict[str, int]:
        epoch = self._current if self._current is not None else int(self.epoch_fn())
        return {"epoch": epoch, "batches_done": int(self.progress())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Exact at epoch boundaries; mid-epoch, the epoch's stream is read again from its start."""
        epoch, done = int(state["epoch"]), int(state.get("batches_done", 0))
        self._resume_epoch = epoch + 1 if done >= self.num_batches else epoch
