"""Where images come from: a folder tree, a class-per-folder tree, or the embedded demo photos.

A source only lists files (``samples()``); reading and augmenting happens in the dataset, so every
source goes through the same loading code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mim_lightning.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int = -1


def _check_root(root: str | os.PathLike | None, key: str) -> Path:
    if root is None or str(root).strip() in ("", "???"):
        raise ConfigError(key, root, "the path of a folder of images, e.g. data.root=/data/images")
    path = Path(os.path.expandvars(str(root))).expanduser()
    if not path.is_dir():
        raise ConfigError(key, str(root), "an existing folder of images", "no such folder")
    return path


def find_images(root: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """All image files under ``root`` (recursive, symlinked folders followed), sorted for determinism."""
    found = []
    for folder, _dirs, files in os.walk(root, followlinks=True):
        found.extend(os.path.join(folder, name) for name in files
                     if name.lower().endswith(extensions) and not name.startswith("."))
    return sorted(found)


class ImageFolderSource:
    """Every image under ``root``, recursively, without labels (``data=folder``)."""

    labelled = False

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

    @property
    def classes(self) -> list[str]:
        return []

    def describe(self) -> str:
        """The source in words (run summaries)."""
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
