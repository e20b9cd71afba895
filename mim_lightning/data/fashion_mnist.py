"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (no download at run time).

The package installs the four idx files under ``/usr/share/datasets/fashion-mnist/``. They are decoded once
into PNG class folders in a cache (``$MIM_LIGHTNING_CACHE/fashion_mnist/{train,test}/<NN_class>/<index>.png``,
default ``~/.cache/mim_lightning``) and then read like any ``data=imagefolder`` tree, so pretraining,
finetuning and probing use the same loading, augmentation and mask code as user data.

``fraction < 1`` keeps a class-stratified subset (the labelled subset of a semi-supervised comparison),
drawn by ``subset_seed`` so that every method and seed sees the same labelled images.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from mim_lightning.data.demo import default_cache_dir
from mim_lightning.data.sources import ClassFolderSource, Sample
from mim_lightning.errors import ConfigError

DEFAULT_RAW_DIR = "/usr/share/datasets/fashion-mnist"
#: Class folder names; the two-digit prefix keeps the official label order when the folders are sorted.
CLASSES = ("00_tshirt_top", "01_trouser", "02_pullover", "03_dress", "04_coat", "05_sandal", "06_shirt",
           "07_sneaker", "08_bag", "09_ankle_boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SPLIT_SIZES = {"train": 60000, "test": 10000}
INSTALL_HINT = "the Fashion-MNIST idx files: install them with `apt-get install dataset-fashion-mnist`"


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    found, count = struct.unpack(">II", data[:8])
    if found != magic:
        raise ConfigError("data.source.raw_dir", str(path.parent), INSTALL_HINT, f"{path.name} is not an idx file")
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    return np.frombuffer(data, dtype=np.uint8, offset=8).reshape(count)


def read_split(raw_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of ``split`` (``train`` or ``test``)."""
    if split not in FILES:
        raise ConfigError("data.source.split", split, "train or test")
    folder = Path(os.path.expandvars(str(raw_dir))).expanduser()
    paths = [folder / name for name in FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConfigError("data.source.raw_dir", str(raw_dir), INSTALL_HINT, f"missing {', '.join(missing)}")
    images, labels = _read_idx(paths[0], 2051), _read_idx(paths[1], 2049)
    if len(images) != len(labels):
        raise ConfigError("data.source.raw_dir", str(raw_dir), INSTALL_HINT, "image and label counts differ")
    return images, labels


def export_split(raw_dir: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write ``split`` as ``<cache>/<split>/<class>/<index>.png`` once (a marker file says it is complete)
    and return the split's folder."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir().parent / "fashion_mnist"
    folder = base / split
    done = folder / ".complete"
    if done.is_file():
        return folder
    images, labels = read_split(raw_dir, split)
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        target = folder / CLASSES[int(label)] / f"{index:05d}.png"
        if target.exists():
            continue
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        Image.fromarray(image, mode="L").save(tmp, format="PNG")
        os.replace(tmp, target)
    done.write_text(f"{len(images)}\n")
    return folder


def stratified_subset(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """``fraction`` of each class's samples (at least one per class), drawn with ``seed``; order kept."""
    rng = np.random.default_rng(int(seed))
    by_class: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(position)
    keep: list[int] = []
    for label in sorted(by_class):
        positions = by_class[label]
        count = max(1, round(len(positions) * fraction))
        keep.extend(rng.choice(positions, size=count, replace=False).tolist())
    return [samples[p] for p in sorted(keep)]


class FashionMNISTSource(ClassFolderSource):
    """Fashion-MNIST ``split`` as a labelled folder source (``data=fashion_mnist``).

    Args:
        raw_dir: where the idx ``.gz`` files are (the Debian package's folder by default).
        split: ``train`` (60k) or ``test`` (10k).
        fraction: keep this class-stratified fraction of the split (0 < fraction <= 1).
        subset_seed: the seed of that subset (fixed across runs so that methods are compared on the same labels).
        cache_dir: where the PNG folders are written (default ``$MIM_LIGHTNING_CACHE/fashion_mnist``).
    """

    def __init__(self, raw_dir: str = DEFAULT_RAW_DIR, split: str = "train", fraction: float = 1.0,
                 subset_seed: int = 0, cache_dir: str | None = None) -> None:
        if split not in FILES:
            raise ConfigError("data.source.split", split, "train or test")
        if not 0 < float(fraction) <= 1:
            raise ConfigError("data.source.fraction", fraction, "a number in (0, 1]")
        self.raw_dir, self.split, self.fraction = raw_dir, split, float(fraction)
        self.subset_seed, self.cache_dir = int(subset_seed), cache_dir
        super().__init__(None, key="data.source.raw_dir")

    def describe(self) -> str:
        part = "" if self.fraction >= 1 else f", a {self.fraction:g} stratified subset"
        return f"Fashion-MNIST {self.split} split ({self.raw_dir}{part})"

    def folder(self) -> Path:
        """The split's PNG class folders (written on first use)."""
        return export_split(self.raw_dir, self.split, self.cache_dir)

    def class_names(self) -> list[str]:
        if self.root is None:
            self.root = str(self.folder())
        return super().class_names()

    def samples(self) -> list[Sample]:
        if self.root is None:
            self.root = str(self.folder())
        samples = super().samples()
        return samples if self.fraction >= 1 else stratified_subset(samples, self.fraction, self.subset_seed)
