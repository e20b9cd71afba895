"""Map-style datasets over a list of image files, with per-sample seeding and bad-file skipping."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mim_lightning.data.sources import Sample
from mim_lightning.data.transforms import MIMTransform

#: How many following samples to try before giving up when files cannot be read.
MAX_CONSECUTIVE_BAD = 64


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images scaled to 8 bits (``convert`` would clip them)."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        array = array / 257.0
    else:
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L")


def as_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB: grayscale, palette, RGBA (alpha dropped), CMYK, 16-bit and float
    images are converted (``load`` is called, so truncated data fails here)."""
    image.load()
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB (see :func:`as_rgb`)."""
    with Image.open(path) as image:
        return as_rgb(image)


def transformed_item(transform: MIMTransform, seed: int, epoch: int, index: int, image: Image.Image,
                     label: int = -1) -> dict:
    """One batch item: ``image`` through ``transform`` seeded by ``(seed, epoch, index)``.

    ``{"images": (3, H, W), "index": int, "mask": (gh, gw) bool (when the transform draws one),
    "label": int (when ``label >= 0``)}`` — the same for every data source.
    """
    images, mask = transform(image, np.random.SeedSequence([int(seed), int(epoch), int(index)]))
    item = {"images": images, "index": int(index)}
    if mask is not None:
        item["mask"] = torch.from_numpy(mask)
    if label >= 0:
        item["label"] = int(label)
    return item


class ImageDataset(Dataset):
    """Images from ``samples`` through a :class:`MIMTransform`.

    Keys are ``index`` or ``(index, epoch)`` (see :class:`~mim_lightning.data.sampler.EpochIndexSampler`);
    the sample is seeded by ``(seed, epoch, index)``. With ``repeat > 1`` the list is walked several
    times per epoch with different crops and masks (useful for tiny datasets). A file that cannot be
    read is skipped (the next one is used), counted in :meth:`num_bad` and reported once.

    Items: ``{"images": (3, H, W) float, "mask": (gh, gw) bool (when a mask generator is set),
    "label": int (labelled sources), "index": int}``.
    """

    def __init__(self, samples: Sequence[Sample], transform: MIMTransform, seed: int = 0, repeat: int = 1) -> None:
        if not samples:
            raise ValueError("ImageDataset needs at least one sample")
        self.samples = list(samples)
        self.transform = transform
        self.seed = int(seed)
        self.repeat = max(1, int(repeat))
        # Shared with dataloader workers (shared memory), so every process sees the same bad-file flags.
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples) * self.repeat

    def num_bad(self) -> int:
        return int(self.bad.sum())

    #: Exceptions that mark a sample unreadable (skipped and counted) rather than a bug.
    unreadable: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

    def open_image(self, sample: Sample) -> Image.Image:
        """The sample's image as 8-bit RGB (a file here; other datasets read rows or bytes)."""
        return load_rgb(sample.path)

    def _load(self, index: int) -> tuple[Sample, Image.Image]:
        count = len(self.samples)
        for offset in range(min(count, MAX_CONSECUTIVE_BAD)):
            position = (index + offset) % count
            if self.bad[position]:
                continue
            sample = self.samples[position]
            try:
                return sample, self.open_image(sample)
            except self.unreadable as exc:
                self.bad[position] = True
                warnings.warn(f"skipping unreadable image {sample.path}: {type(exc).__name__}: {exc}", stacklevel=2)
        raise RuntimeError(f"no readable image among {min(count, MAX_CONSECUTIVE_BAD)} files starting at "
                           f"{self.samples[index % count].path}; {self.num_bad()} unreadable so far")

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        sample, image = self._load(index % len(self.samples))
        return transformed_item(self.transform, self.seed, epoch, index, image, sample.label)
