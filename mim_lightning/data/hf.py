"""Hugging Face ``datasets`` as a pretraining source: ``data=hf``.

A map-style dataset (``Dataset.save_to_disk`` folder, or a dataset in the user's ``datasets`` cache /
on the Hub when the machine is online) goes through exactly the folder-data path: the same seeded
train/val split, :class:`~mim_lightning.data.sampler.EpochIndexSampler` rank split, per-sample
``SeedSequence([seed, epoch, index])`` crops and masks, exact mid-epoch resume and unreadable-row
skipping; only the image comes from a row instead of a file.

``streaming: true`` reads the rows as an iterable instead (``load_dataset(..., streaming=True)``, or
``to_iterable_dataset`` for a saved dataset): nothing is materialised or memory-mapped up front. It
is served by :class:`HFStreamDataset`: rank and worker shards via ``split_dataset_by_node`` and the
dataset's own worker split, a fixed number of batches per device per epoch (``epoch_size`` samples
in all, required), the epoch passed to ``set_epoch`` (shard order and buffer shuffle), and a resume
exact at epoch boundaries. Mid-epoch, a resumed run reads that epoch's stream again from its start
for the steps left (``datasets`` streams cannot seek), so some of the epoch's rows are seen twice
and others not at all in that one epoch; later epochs are as in an uninterrupted run. Streamed rows
are indexed by their position in the rank's stream (the map-style path uses the row number).
An epoch is ``epoch_size`` samples: a worker whose shards hold fewer rows than its share starts
them over, one with more leaves the rest for later epochs (as ``webdataset``'s ``with_epoch`` does);
save the dataset with a shard count divisible by ``devices x num_workers`` to keep epochs even.
"""

from __future__ import annotations

import io
import itertools
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate

from mim_lightning.data.datamodule import PretrainDataModule, collate_batch_mask, total_count
from mim_lightning.data.datasets import ImageDataset, as_rgb, load_rgb, transformed_item
from mim_lightning.data.sources import Sample
from mim_lightning.data.transforms import MIMTransform
from mim_lightning.errors import ConfigError


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("data", "hf", "an environment with the `datasets` package (pip install datasets)",
                          "`datasets` is not installed") from None
    return datasets


def to_rgb(value: Any) -> Image.Image:
    """A row's image as 8-bit RGB: a PIL image (``datasets.Image`` feature), ``{"bytes", "path"}``,
    raw bytes, a file path, or an HWC uint8 array; converted as :func:`load_rgb` converts files."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        return load_rgb(str(value))
    elif isinstance(value, np.ndarray) or (isinstance(value, list) and value):
        value = Image.fromarray(np.asarray(value, dtype=np.uint8))
    if not isinstance(value, Image.Image):
        raise ValueError(f"not an image: {type(value).__name__}")
    return as_rgb(value)


def load_hf(path: str | None, name: str | None, split: str, cache_dir: str | None, streaming: bool,
            key: str = "data.path"):
    """``load_from_disk(path)`` for a saved dataset folder (a DatasetDict gives its ``split``), else
    ``load_dataset(path, name, split=split)`` (the Hub or the local ``datasets`` cache)."""
    datasets = _require_datasets()
    if path is None or str(path).strip() in ("", "???"):
        raise ConfigError(key, path, "a folder written by Dataset.save_to_disk, or a dataset name in the datasets cache")
    local = Path(os.path.expandvars(str(path))).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()
                               or (local / "state.json").is_file()):
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ConfigError("data.split", split, ", ".join(data))
                data = data[split]
            return data.to_iterable_dataset(num_shards=min(len(data), 1024)) if streaming else data
        return datasets.load_dataset(str(path), name, split=split, cache_dir=cache_dir, streaming=streaming)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a missing/unreachable dataset
        raise ConfigError(key, str(path), "a saved dataset folder or a dataset available offline in the cache",
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def check_columns(columns: Sequence[str], image_column: str, label_column: str | None) -> None:
    if image_column not in columns:
        raise ConfigError("data.image_column", image_column, ", ".join(columns))
    if label_column is not None and label_column not in columns:
        raise ConfigError("data.label_column", label_column, ", ".join(columns) + " or null")


class HFImageDataset(ImageDataset):
    """:class:`~mim_lightning.data.datasets.ImageDataset` over rows of a ``datasets.Dataset``: sample
    ``path`` is the row number; an unreadable row is skipped (the next one used) and counted."""

    def __init__(self, table: Any, samples: Sequence[Sample], transform: MIMTransform, image_column: str,
                 seed: int = 0, repeat: int = 1, **kwargs: Any) -> None:
        super().__init__(samples, transform, seed=seed, repeat=repeat, **kwargs)
        self.table = table
        self.image_column = image_column

    unreadable = ImageDataset.unreadable + (TypeError,)

    def open_image(self, sample: Sample) -> Image.Image:
        """Row ``sample.path`` (its row number) of the table."""
        return to_rgb(self.table[int(sample.path)][self.image_column])

    def describe_sample(self, position: int) -> str:
        return f"row {self.samples[position].path}"


class HFStreamDataset(IterableDataset):
    """Rows of a streaming ``datasets.IterableDataset`` through a :class:`MIMTransform`; each rank
    reads its own part (``split_dataset_by_node``); ``index`` is the row's position in this rank's
    stream times the world size plus the rank (unique per epoch), seeding crops and masks."""

    def __init__(self, stream: Any, transform: MIMTransform, image_column: str, label_column: str | None,
                 seed: int = 0, shuffle_buffer: int = 1000) -> None:
        self.stream = stream
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.epoch, self.rank, self.world_size, self.limit, self.batch_size = 0, 0, 1, 0, 1
        # Shared with the loader workers: unreadable rows read (a row read again in a later epoch counts
        # again: a stream has no stable row ids), and whether one was warned about (once per run).
        self.bad = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.warned = torch.zeros(1, dtype=torch.bool).share_memory_()

    def num_bad(self) -> int:
        return int(self.bad.sum())

    def __iter__(self) -> Iterator[dict]:
        from datasets.distributed import split_dataset_by_node
        from torch.utils.data import get_worker_info

        stream = self.stream
        if self.shuffle_buffer > 1:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        stream.set_epoch(self.epoch)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # datasets deals its shards to the DataLoader workers itself (workers beyond n_shards get none);
        # this worker's quota, in whole batches, of the batches every rank yields:
        active = max(1, min(workers, int(getattr(stream, "n_shards", workers) or workers)))
        batches = self.limit // self.batch_size
        quota = 0 if worker >= active else (batches // active + (1 if worker < batches % active else 0)) * self.batch_size
        produced = 0
        for position, row in enumerate(_cycle(stream) if quota else ()):
            if produced >= quota:
                return
            index = (position * workers + worker) * self.world_size + self.rank
            try:
                image = to_rgb(row[self.image_column])
            except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as exc:
                self.bad += 1
                if not self.warned[0]:
                    self.warned[0] = True
                    warnings.warn(f"skipping unreadable streamed row: {type(exc).__name__}: {exc} (further ones are "
                                  "counted in data/skipped, not reported)", stacklevel=2)
                continue
            label = row.get(self.label_column) if self.label_column is not None else None
            produced += 1
            yield transformed_item(self.transform, self.seed, self.epoch, index, image, -1 if label is None else int(label))


def _cycle(stream: Any) -> Iterator[dict]:
    """The stream, started over when it ends before the epoch's quota (so every rank fills it)."""
    while True:
        empty = True
        for row in stream:
            empty = False
            yield row
        if empty:
            raise RuntimeError("the streamed dataset gave no rows to this rank/worker")


class HFDataModule(PretrainDataModule):
    """Pretraining images from a Hugging Face dataset (``data=hf``), with the transforms, masks,
    batches, split and resume of :class:`~mim_lightning.data.PretrainDataModule`.

    Args:
        path: a ``save_to_disk`` folder, or a dataset name for ``load_dataset`` (the user's cache; the Hub
            when online). None: the demo photos saved as a dataset in the cache (a smoke test).
        name, split, cache_dir: passed to ``load_dataset`` (``split`` also picks from a saved DatasetDict).
        image_column: the column holding images (``datasets.Image``, bytes, paths or arrays).
        label_column: optional integer label column (kept for probes and finetuning).
        streaming: read rows as a stream (see the module docstring); needs ``epoch_size``.
        epoch_size: samples per epoch over all devices when streaming.
        shuffle_buffer: rows in the stream's shuffle buffer when streaming.
        Other arguments: as for ``PretrainDataModule``.
    """

    def __init__(self, path: str | None = None, name: str | None = None, split: str = "train",
                 image_column: str = "image", label_column: str | None = None, streaming: bool = False,
                 epoch_size: int | None = None, shuffle_buffer: int = 1000, cache_dir: str | None = None,
                 **kwargs: Any) -> None:
        kwargs.pop("source", None)
        super().__init__(source=None, **kwargs)  # type: ignore[arg-type]
        self.path, self.name, self.split, self.cache_dir = path, name, split, cache_dir
        self.image_column, self.label_column = image_column, label_column
        self.streaming = bool(streaming)
        self.epoch_size = None if epoch_size is None else int(epoch_size)
        self.shuffle_buffer = int(shuffle_buffer)
        self._epoch = 0
        if self.streaming and (self.epoch_size is None or self.epoch_size < 1):
            raise ConfigError("data.epoch_size", epoch_size, "the number of samples per epoch (all devices) when "
                                                             "data.streaming=true")

    def _dataset_path(self) -> str:
        if self.path is not None:
            return str(self.path)
        return str(demo_dataset(self.cache_dir))

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        table = load_hf(self._dataset_path(), self.name, self.split, self.cache_dir, self.streaming)
        columns = list(table.column_names or []) if self.streaming else list(table.column_names)
        if columns:
            check_columns(columns, self.image_column, self.label_column)
        features = getattr(table, "features", None) or {}
        label_feature = features.get(self.label_column) if self.label_column else None
        self.classes = list(getattr(label_feature, "names", None) or [])
        if self.streaming:
            self.train_dataset = HFStreamDataset(table, self.train_transform, self.image_column, self.label_column,
                                                 seed=self.seed, shuffle_buffer=self.shuffle_buffer)
            self.val_dataset = None
            self._check_batch_size(world_size=self._rank_and_world()[1])
            return
        labels = table[self.label_column] if self.label_column else None
        samples = [Sample(str(i), int(labels[i]) if labels is not None else -1) for i in range(len(table))]
        if not samples:
            raise ConfigError("data.path", self.path, "a dataset with at least one row", "it is empty")
        self._table = table
        train, val = self.split_samples(samples)
        self._make_datasets(train, val)

    def _source_key(self) -> tuple[str, Any]:
        return "data.path", self.path

    def _dataset(self, samples: Sequence[Sample], train: bool) -> HFImageDataset:
        key, value = self._source_key()
        if train:
            return HFImageDataset(self._table, samples, self.train_transform, self.image_column, seed=self.seed,
                                  repeat=self.repeat, key=key, value=value)
        return HFImageDataset(self._table, samples, self.val_transform, self.image_column, seed=self.seed + 1,
                              replace_within=None, mark_replaced=True, key=key, value=value)

    def describe(self) -> dict[str, Any]:
        """As :meth:`PretrainDataModule.describe`; a stream has ``images``/``train`` None and ``val`` 0."""
        demo = self.path is None
        source = "demo photos as a Hugging Face dataset (17 images from scikit-image)" if demo else f"hf {self.path}"
        if self.streaming:
            return {"source": source + " (streamed)", "demo": demo, "images": None, "train": None, "val": 0,
                    "classes": len(self.classes), "skipped": self._local_skipped(), "repeat": self.repeat}
        train = len(self.train_dataset.samples) if self.train_dataset is not None else None
        val = len(self.val_dataset.samples) if self.val_dataset is not None else 0
        return {"source": source, "demo": demo, "images": None if train is None else train + val, "train": train,
                "val": val, "classes": len(self.classes), "skipped": self._local_skipped(), "repeat": self.repeat}

    def _local_skipped(self) -> int:
        if self.streaming:
            return self.train_dataset.num_bad() if self.train_dataset is not None else 0
        return super()._local_skipped()

    def num_skipped(self) -> int:
        """Unreadable rows so far: distinct rows over workers and ranks (map-style), or the rows read
        unreadable by every worker and rank (streaming; a collective under DDP)."""
        if not self.streaming:
            return super().num_skipped()
        return total_count(self._local_skipped(), self.trainer)

    def _check_batch_size(self, world_size: int) -> None:
        if not self.streaming:
            super()._check_batch_size(world_size)
            return
        if self.epoch_size // world_size < self.batch_size:
            raise ConfigError("data.batch_size", self.batch_size,
                              f"at most data.epoch_size / devices = {self.epoch_size // world_size}")

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def train_dataloader(self) -> DataLoader:
        if not self.streaming:
            return super().train_dataloader()
        self.setup("fit")
        rank, world = self._rank_and_world()
        self._check_batch_size(world)
        loader = _StreamLoader(self, rank, world)
        self._train_loader = loader  # type: ignore[assignment]
        return loader


class _StreamLoader(DataLoader):
    """Streaming loader: ``epoch_size // (devices x batch)`` batches per device; the position saved is
    the epoch (a mid-epoch resume restarts that epoch)."""

    def __init__(self, module: HFDataModule, rank: int, world: int) -> None:
        self.module, self.rank, self.world = module, rank, world
        self.num_batches = module.epoch_size // world // module.batch_size
        self._resume_epoch: int | None = None
        self._current: int | None = None
        collate = collate_batch_mask if getattr(module.mask_generator, "per_batch", False) else default_collate
        extra: dict[str, Any] = {}
        if module.num_workers > 0 and module.prefetch_factor is not None:
            extra["prefetch_factor"] = int(module.prefetch_factor)
        super().__init__(module.train_dataset, batch_size=module.batch_size, num_workers=module.num_workers,
                         collate_fn=collate, pin_memory=module.pin_memory and torch.cuda.is_available(), **extra)

    def _epoch(self) -> int:
        trainer = self.module.trainer
        return self.module._epoch if trainer is None else int(trainer.current_epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        dataset: HFStreamDataset = self.dataset
        # A restored epoch wins: Lightning creates a resumed fit's first iterator before its loops
        # report the restored epoch.
        epoch = self._resume_epoch if self._resume_epoch is not None else self._epoch()
        self._resume_epoch = None
        self._current = epoch
        dataset.epoch, dataset.rank, dataset.world_size = epoch, self.rank, self.world
        dataset.limit, dataset.batch_size = self.num_batches * self.batch_size, self.batch_size
        return itertools.islice(super().__iter__(), self.num_batches)

    def state_dict(self) -> dict[str, int]:
        epoch = self._current if self._current is not None else self._epoch()
        return {"epoch": epoch, "batches_done": int(self.module._batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Exact at epoch boundaries; mid-epoch, the epoch's stream is read again from its start."""
        epoch, done = int(state["epoch"]), int(state.get("batches_done", 0))
        self._resume_epoch = epoch + 1 if done >= self.num_batches else epoch


def demo_dataset(cache_dir: str | None = None) -> Path:
    """The demo photos saved as a ``datasets.Dataset`` (column ``image``) in ``cache_dir`` (default
    ``$MIM_LIGHTNING_CACHE/demo_hf``); idempotent."""
    from mim_lightning.data.demo import default_cache_dir, write_demo_photos

    datasets = _require_datasets()
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir().parent / "demo_hf"
    if not (folder / "dataset_info.json").is_file():
        paths = sorted(str(p) for p in write_demo_photos(default_cache_dir()))
        table = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        table.save_to_disk(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process saved it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder
