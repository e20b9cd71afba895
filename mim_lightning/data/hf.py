"""Hugging Face ``datasets`` as sources: ``data=hf``.

A map-style dataset (a ``Dataset.save_to_disk`` folder, or a dataset in the user's ``datasets`` cache / on
the Hub when online) is an indexed source of rows (:class:`HFSource`): it goes through exactly the
folder-data path (the same seeded train/val split, rank split, per-sample ``(seed, epoch, index)`` crops
and masks, exact mid-epoch resume and unreadable-row skipping); only the image comes from a row.
Images stored as ``datasets.Image`` are read undecoded (``decode=False``) and opened lazily, so
``data.fast_decode`` applies to them as to files.

``source.streaming: true`` reads the rows as a stream instead (:class:`HFStreamSource`, served by
:mod:`mim_lightning.data.stream`): nothing is materialised up front; rank shards come from
``split_dataset_by_node`` and worker shards from the dataset's own split; an epoch is
``source.epoch_size`` samples (required); resume is exact at epoch boundaries. Save the dataset with a
shard count divisible by ``devices x num_workers`` to keep epochs even.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mim_lightning.data.sources import Sample, Source
from mim_lightning.errors import ConfigError

KEY = "data.source.path"


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("data", "hf", "an environment with the `datasets` package (pip install datasets)",
                          "`datasets` is not installed") from None
    return datasets


def to_image(value: Any) -> Image.Image:
    """A row's image, opened (decoded lazily where it can be): a PIL image (``datasets.Image`` feature),
    ``{"bytes", "path"}``, raw bytes, a file path, or an HWC uint8 array."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        value = Image.open(str(value))
    elif isinstance(value, np.ndarray) or (isinstance(value, list) and value):
        value = Image.fromarray(np.asarray(value, dtype=np.uint8))
    if not isinstance(value, Image.Image):
        raise ValueError(f"not an image: {type(value).__name__}")
    return value


def load_hf(path: str | None, name: str | None, split: str, cache_dir: str | None, streaming: bool,
            key: str = KEY):
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
                    raise ConfigError("data.source.split", split, ", ".join(data))
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
        raise ConfigError("data.source.image_column", image_column, ", ".join(columns))
    if label_column is not None and label_column not in columns:
        raise ConfigError("data.source.label_column", label_column, ", ".join(columns) + " or null")


def _class_names(features: Any, label_column: str | None, labels: Sequence[int] | None) -> list[str]:
    """A ``ClassLabel`` column's names, else ``"0" .. str(max label)`` for a plain integer column."""
    feature = (features or {}).get(label_column) if label_column else None
    names = list(getattr(feature, "names", None) or [])
    if names or not labels:
        return names
    return [str(i) for i in range(int(max(labels)) + 1)]


class HFSource(Source):
    """Rows of a map-style ``datasets.Dataset`` as an indexed source (``data=hf``); a sample's ``path`` is its
    row number.

    Args:
        path: a ``save_to_disk`` folder, or a dataset name for ``load_dataset`` (the user's cache; the Hub when
            online). None: the demo photos saved as a dataset in the cache (a smoke test).
        name, split, cache_dir: passed to ``load_dataset`` (``split`` also picks from a saved DatasetDict).
        image_column: the column holding images (``datasets.Image``, bytes, paths or arrays).
        label_column: an integer label column (``ClassLabel`` or plain integers; null: unlabelled).
    """

    key = KEY
    unreadable = Source.unreadable + (TypeError,)

    def __init__(self, path: str | None = None, name: str | None = None, split: str = "train",
                 image_column: str = "image", label_column: str | None = None, cache_dir: str | None = None) -> None:
        self.path, self.name, self.split, self.cache_dir = path, name, split, cache_dir
        self.image_column, self.label_column = image_column, label_column
        self.labelled = label_column is not None
        self.demo = path is None
        self.table: Any = None
        self._classes: list[str] = []

    def _load(self) -> Any:
        if self.table is None:
            datasets = _require_datasets()
            path = str(self.path) if self.path is not None else str(demo_dataset(self.cache_dir))
            table = load_hf(path, self.name, self.split, self.cache_dir, streaming=False)
            check_columns(list(table.column_names), self.image_column, self.label_column)
            if isinstance(table.features.get(self.image_column), datasets.Image):  # bytes: decoded lazily, per sample
                table = table.cast_column(self.image_column, datasets.Image(decode=False))
            self.table = table
        return self.table

    def samples(self) -> list[Sample]:
        table = self._load()
        if len(table) == 0:
            raise ConfigError(KEY, self.path, "a dataset with at least one row", "it is empty")
        labels = [int(v) for v in table[self.label_column]] if self.label_column else None
        self._classes = _class_names(table.features, self.label_column, labels)
        return [Sample(str(i), labels[i] if labels is not None else -1) for i in range(len(table))]

    @property
    def classes(self) -> list[str]:
        if self.label_column and not self._classes:
            self.samples()
        return self._classes

    def open(self, sample: Sample) -> Image.Image:
        return to_image(self._load()[int(sample.path)][self.image_column])

    def describe(self) -> str:
        return "demo photos as a Hugging Face dataset (17 images from scikit-image)" if self.demo else f"hf {self.path}"

    def describe_sample(self, sample: Sample) -> str:
        return f"row {sample.path}"


class HFStreamSource(HFSource):
    """A ``datasets`` dataset read as a stream (``data=hf data.source.streaming=true``; see the module docstring).

    Args:
        epoch_size: samples per epoch over all devices (required).
        shuffle_buffer: rows in the stream's shuffle buffer.
        The others: as :class:`HFSource`.
    """

    streaming = True

    def __init__(self, path: str | None = None, name: str | None = None, split: str = "train",
                 image_column: str = "image", label_column: str | None = None, cache_dir: str | None = None,
                 epoch_size: int | None = None, shuffle_buffer: int = 1000) -> None:
        super().__init__(path, name, split, image_column, label_column, cache_dir)
        if epoch_size is None or int(epoch_size) < 1:
            raise ConfigError("data.source.epoch_size", epoch_size, "the number of samples per epoch (all devices) when "
                                                                    "data.source.streaming=true")
        self.epoch_size = int(epoch_size)
        self.shuffle_buffer = int(shuffle_buffer)

    def _load(self) -> Any:
        if self.table is None:
            path = str(self.path) if self.path is not None else str(demo_dataset(self.cache_dir))
            table = load_hf(path, self.name, self.split, self.cache_dir, streaming=True)
            columns = list(table.column_names or [])
            if columns:
                check_columns(columns, self.image_column, self.label_column)
            self.table = table
            self._classes = _class_names(getattr(table, "features", None), self.label_column, None)
        return self.table

    def samples(self) -> list[Sample]:
        raise TypeError("a stream source has no sample list")

    @property
    def classes(self) -> list[str]:
        self._load()
        return self._classes

    def rows(self, rank: int, world_size: int, epoch: int, seed: int) -> Any:
        from datasets.distributed import split_dataset_by_node

        stream = self._load()
        if self.shuffle_buffer > 1:
            stream = stream.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        stream.set_epoch(epoch)
        return stream

    def decode(self, row: dict) -> tuple[Image.Image, int]:
        label = row.get(self.label_column) if self.label_column is not None else None
        return to_image(row[self.image_column]), -1 if label is None else int(label)

    def describe(self) -> str:
        return super().describe() + " (streamed)"


def hf_source(streaming: bool = False, epoch_size: int | None = None, shuffle_buffer: int = 1000,
              **kwargs: Any) -> HFSource:
    """The ``data=hf`` source: :class:`HFStreamSource` when ``streaming``, else :class:`HFSource`."""
    if streaming:
        return HFStreamSource(epoch_size=epoch_size, shuffle_buffer=shuffle_buffer, **kwargs)
    return HFSource(**kwargs)


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
