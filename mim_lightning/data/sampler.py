"""A sampler that shards by rank and tells each sample its epoch, the loader that resumes mid-epoch, and
the DataModule mixin that carries the training position in checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


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
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self._skip = 0
        self.epoch = int(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        """Make the next iteration of ``epoch`` start after its first ``skip`` keys (mid-epoch resume)."""
        self.epoch = int(epoch)
        self._skip = max(0, int(skip))

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
        epoch, skip = self.epoch, self._skip
        self._skip = 0
        return iter([(index, epoch) for index in self.indices()[skip:]])


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochIndexSampler` that can start an epoch part-way through.

    ``state_dict()`` is the epoch and the number of batches already trained on in it, read from the
    trainer through ``progress`` (so it does not depend on how many batches the loader or its workers
    had prefetched); ``load_state_dict`` makes the sampler skip exactly those batches, so a run
    restarted mid-epoch sees the same samples, crops and masks as one that never stopped.
    The DataModule saves and restores this state itself (Lightning restores loader states only when
    it did not build the loader early, e.g. for ``estimated_stepping_batches``); being a stateful
    loader also tells Lightning the resume is exact.
    """

    def __init__(self, *args: Any, progress: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochIndexSampler):
            raise TypeError("ResumableDataLoader needs an EpochIndexSampler")
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        done = int(self.progress()) if self.progress is not None else 0
        return {"epoch": self.sampler.epoch, "batches_done": done, "batch_size": int(self.batch_size or 1)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= len(self):
            self.sampler.resume(epoch + 1, 0)
        else:
            self.sampler.resume(epoch, done * int(state.get("batch_size", self.batch_size or 1)))


class TrainPositionState:
    """DataModule mixin: the training loader's position (epoch, batches done) travels in checkpoints.

    Lightning restores a loader's own state only when it has not built the loader yet, which it has
    when ``estimated_stepping_batches`` is read in ``configure_optimizers``; the DataModule's
    ``state_dict``/``load_state_dict`` are always called, before the loader is (re)built. A subclass
    passes each training loader it builds through :meth:`_track_train_loader`.
    """

    _train_loader: Any = None
    _resume_state: dict | None = None

    def _track_train_loader(self, loader: Any) -> Any:
        """Remember the training loader and apply a position restored before it was built."""
        if self._resume_state is not None:
            loader.load_state_dict(self._resume_state)
            self._resume_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict:
        """The training position (epoch, batches done), saved in every checkpoint for exact resumes."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Called by Lightning when resuming, before the training loader is built."""
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._resume_state = dict(state)
