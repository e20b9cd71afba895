"""Where images come from: one small class per kind of data, all read through the same dataset code.

A *source* lists its samples and opens one; everything else (train/val split, rank split, per-sample
seeding of crops and masks, equal batches per rank, exact mid-epoch resume, skipping and counting
unreadable samples) is done once, by :class:`~mim_lightning.data.datasets.ImageDataset`,
:class:`~mim_lightning.data.sampler.EpochIndexSampler` and
:class:`~mim_lightning.data.datamodule.PretrainDataModule`, for every source.

Two kinds:

- an indexed source (:class:`Source`): ``samples()`` lists :class:`Sample` s (a key and a label) and
  ``open(sample)`` returns the sample's image (a lazily decoded PIL image is best: ``data.fast_decode``
  can then decode JPEGs at a reduced scale). Folders, class folders, the demo photos, Fashion-MNIST,
  Hugging Face map-style datasets and tar shards (through ``wids``) are indexed sources.
- a stream source (``streaming = True``, see :mod:`mim_lightning.data.stream`): rows arrive as an
  iterable of unknown length and cannot seek (Hugging Face ``streaming=True``).

Adding a source: subclass :class:`Source` (``samples``, ``open``, ``describe``; ``classes`` and
``labelled`` when it has labels) and add ``conf/data/<name>.yaml`` that names it under ``source:``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mim_lightning import runlog
from mim_lightning.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm")


@dataclass(frozen=True)
class Sample:
    """One sample of a source: ``path`` is the source's key for it (a file path, a row number, a shard
    position), ``label`` its class index (-1: unlabelled)."""

    path: str
    label: int = -1


class Source:
    """The interface every indexed source implements (see the module docstring).

    Attributes:
        key: the config key that names where the data is (one-line errors say it).
        labelled: whether ``samples()`` carry labels (probes and finetuning need them).
        demo: whether this is one of the embedded demo sets (run summaries say so).
        streaming: False for an indexed source.
        root: where the data is (``data.root`` replaces it when set); None where it does not apply.
    """

    key = "data.root"
    labelled = False
    demo = False
    streaming = False
    root: str | None = None
    #: Exceptions that mark a sample unreadable (skipped and counted) rather than a bug.
    unreadable: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

    def samples(self) -> list[Sample]:
        raise NotImplementedError

    def open(self, sample: Sample) -> Image.Image:
        """The sample's image, not necessarily decoded yet (the dataset converts it to RGB)."""
        raise NotImplementedError

    @property
    def classes(self) -> list[str]:
        return []

    def class_names(self) -> list[str]:
        return list(self.classes)

    def describe(self) -> str:
        """The source in words (run summaries)."""
        return type(self).__name__

    def describe_sample(self, sample: Sample) -> str:
        """A sample in words (warnings about unreadable ones)."""
        return str(sample.path)


def _check_root(root: str | os.PathLike | None, key: str) -> Path:
    if root is None or str(root).strip() in ("", "???"):
        raise ConfigError(key, root, "the path of a folder of images, e.g. data.root=/data/images")
    path = Path(os.path.expandvars(str(root))).expanduser()
    if not path.is_dir():
        raise ConfigError(key, str(root), "an existing folder of images", "no such folder")
    return path


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (``stat.S_IFMT`` of ``mode``)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


class NotARegularFile(OSError):
    """A sample path that is a FIFO, socket, device or folder: never opened (a FIFO would block forever)."""


def check_regular(path: str) -> None:
    """Raise :class:`NotARegularFile` unless ``path`` (symlinks resolved) is a regular file."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{path} is {file_kind(mode)}, not an image file")


def _example(paths: list[str], limit: int = 3) -> str:
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def find_images(root: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """All image files under ``root``, recursively, sorted for determinism.

    Symlinked folders are followed, but every folder is listed once, by its ``(st_dev, st_ino)``: a symlink
    loop or a link back to a parent adds nothing (``os.walk(followlinks=True)`` would list the files once per
    way round the loop, or forever with two such links), and a folder linked twice is read once (so the
    held-out split cannot hold copies of training files). Only regular files are listed (symlinks resolved):
    a FIFO, socket or device named like an image is left out, as is a dangling symlink. Skipped folders and
    files are reported in one warning line each; plain symlinked folders are not.
    """
    root = Path(root)
    found: list[str] = []
    loops: list[str] = []
    repeated: list[str] = []
    irregular: list[str] = []
    unlisted: list[str] = []
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            unlisted.append(folder)
            continue
        folders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    info = entry.stat()
                except OSError:
                    unlisted.append(entry.path)
                    continue
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    target, here = os.path.realpath(entry.path), os.path.realpath(folder)
                    is_loop = here == target or here.startswith(target.rstrip(os.sep) + os.sep)
                    (loops if is_loop else repeated).append(f"{entry.path} -> {target}")
                    continue
                seen.add(key)
                folders.append(entry.path)
                continue
            name = entry.name
            if name.startswith(".") or not name.lower().endswith(extensions):
                continue
            try:
                regular = entry.is_file()  # S_ISREG of the target (no system call for plain files)
                if not regular:
                    irregular.append(f"{entry.path} ({file_kind(entry.stat().st_mode)})")
            except OSError:
                regular = False
                irregular.append(f"{entry.path} (a dangling symlink)")
            if regular:
                found.append(entry.path)
        stack.extend(reversed(folders))  # depth first, in name order
    if loops:
        runlog.warning(f"{root}: {len(loops)} symlink loop(s) not followed (each folder is listed once): {_example(loops)}")
    if repeated:
        runlog.warning(f"{root}: {len(repeated)} folder(s) reached twice through symlinks, listed once: {_example(repeated)}")
    if irregular:
        runlog.warning(f"{root}: {len(irregular)} file(s) named like images are not regular files, left out: "
                       f"{_example(irregular)}")
    if unlisted:
        runlog.warning(f"{root}: {len(unlisted)} folder(s) could not be listed, left out: {_example(unlisted)}")
    return sorted(found)


class ImageFolderSource(Source):
    """Every image under ``root``, recursively, without labels (``data=folder``)."""

    def __init__(self, root: str | None = None, extensions: tuple[str, ...] | list[str] = IMAGE_EXTENSIONS,
                 key: str = "data.root") -> None:
        self.root = root
        self.extensions = tuple(e.lower() for e in extensions)
        self.key = key

    def samples(self) -> list[Sample]:
        root = _check_root(self.root, self.key)
        paths = find_images(root, self.extensions)
        if not paths:
            raise ConfigError(self.key, str(self.root), f"a folder containing images ({', '.join(self.extensions)})",
                              "no images found")
        return [Sample(p) for p in paths]

    def open(self, sample: Sample) -> Image.Image:
        check_regular(sample.path)  # a file replaced by a FIFO since listing must not block the loader
        return Image.open(sample.path)

    def describe(self) -> str:
        return f"folder {self.root}"


class ClassFolderSource(ImageFolderSource):
    """``root/<class>/**/<image>``: one sub-folder per class, labels kept (``data=imagefolder``)."""

    labelled = True

    def describe(self) -> str:
        return f"class folders {self.root}"

    def class_names(self) -> list[str]:
        root = _check_root(self.root, self.key)
        return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))

    @property
    def classes(self) -> list[str]:
        return self.class_names()

    def samples(self) -> list[Sample]:
        root = _check_root(self.root, self.key)
        names = self.class_names()
        if not names:
            raise ConfigError(self.key, str(self.root), "a folder with one sub-folder of images per class",
                              "no class sub-folders")
        samples = [Sample(path, label) for label, name in enumerate(names)
                   for path in find_images(root / name, self.extensions)]
        if not samples:
            raise ConfigError(self.key, str(self.root), "class sub-folders containing images", "no images found")
        return samples
