"""The one map-style dataset every indexed source goes through: per-sample seeding and bad-sample skipping."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mim_lightning.data.sources import ImageFolderSource, Sample, Source
from mim_lightning.data.transforms import MIMTransform, UnreadableImage, as_rgb
from mim_lightning.errors import ConfigError

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


class NoReadableImagesError(ConfigError):
    """Every file a dataset could try failed to decode (a one-line error naming the data key).

    Raised in a DataLoader worker, it reaches the main process as itself, still one line: torch rebuilds a
    worker's exception as ``type(message=<worker traceback>)`` when the type has a ``message`` attribute,
    and the original line is the traceback's last one (a plain ConfigError would become a RuntimeError
    holding the whole traceback)."""

    message = "rebuilt from a DataLoader worker's traceback"

    def __init__(self, key: str = "data.root", value: object = None, allowed: str = "", problem: str | None = None,
                 *, message: str | None = None) -> None:
        if message is None:
            super().__init__(key, value, allowed, problem)
            return
        last = next((line for line in reversed(str(message).splitlines()) if line.strip()), "")
        text = last.split(f"{type(self).__name__}: ", 1)[-1].strip()
        ValueError.__init__(self, text)
        self.key, self.value, self.allowed, self.problem = text.split("=", 1)[0], None, "", text


def no_readable_images(key: str, value: object, tried: int, total: int, which: str = "") -> NoReadableImagesError:
    """The one-line error for a source none of whose ``tried`` (of ``total``) ``which`` files decode."""
    what = f"all {total} {which}files failed to decode" if tried >= total else \
        f"all {tried} of {total} {which}files tried failed to decode"
    return NoReadableImagesError(key, value, "a folder with at least one readable image (jpg, png, webp, ...)",
                                 f"no readable {which}images: {what}")


class ImageDataset(Dataset):
    """Images of ``samples`` (opened by ``source``: files when None) through a :class:`MIMTransform`.

    Keys are ``index`` or ``(index, epoch)`` (see :class:`~mim_lightning.data.sampler.EpochIndexSampler`);
    the sample is seeded by ``(seed, epoch, index)``. With ``repeat > 1`` the list is walked several
    times per epoch with different crops and masks (useful for tiny datasets).

    A file that cannot be read is replaced by the next readable one (in list order, wrapping; at most
    ``replace_within`` files are tried, None (the default): the whole list, so however many unreadable files
    follow one another the run goes on), flagged in :attr:`bad` (shared memory, so every loader worker sees it,
    each file is warned about once and tried once) and counted in :meth:`num_bad`.
    ``mark_replaced=True`` (validation) adds ``"valid": False`` to a replaced item (True otherwise), so
    metrics can leave the stand-in out. When every file has failed, :class:`NoReadableImagesError`.

    Items: ``{"images": (3, H, W) float, "mask": (gh, gw) bool (when a mask generator is set),
    "label": int (labelled sources), "index": int, "valid": bool (with ``mark_replaced``)}``.
    """

    def __init__(self, samples: Sequence[Sample], transform: MIMTransform, seed: int = 0, repeat: int = 1,
                 replace_within: int | None = None, mark_replaced: bool = False,
                 key: str = "data.root", value: object = None, source: Source | None = None) -> None:
        if not samples:
            raise ValueError("ImageDataset needs at least one sample")
        self.source = source if source is not None else ImageFolderSource()
        self.samples = list(samples)
        self.transform = transform
        self.seed = int(seed)
        self.repeat = max(1, int(repeat))
        self.replace_within = None if replace_within is None else max(1, int(replace_within))
        self.mark_replaced = bool(mark_replaced)
        self.key, self.value = key, value
        # Shared with dataloader workers (shared memory), so every process sees the same bad-file flags.
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples) * self.repeat

    def num_bad(self) -> int:
        """Distinct unreadable samples found so far, by any process (loader workers included)."""
        return int(self.bad.sum())

    @property
    def unreadable(self) -> tuple[type[BaseException], ...]:
        """Exceptions that mark a sample unreadable (skipped and counted) rather than a bug."""
        return tuple(self.source.unreadable) + (UnreadableImage,)

    def open_lazy(self, position: int) -> tuple[Image.Image, int]:
        """Sample ``position``'s image as the source opens it (a transform with ``lazy`` decodes it)."""
        sample = self.samples[position]
        return self.source.open(sample), sample.label

    def read(self, position: int) -> tuple[Image.Image, int]:
        """Sample ``position``'s image as 8-bit RGB and its label (raises one of :attr:`unreadable`)."""
        image, label = self.open_lazy(position)
        return as_rgb(image), label

    def describe_sample(self, position: int) -> str:
        return self.source.describe_sample(self.samples[position])

    def _flag_bad(self, position: int, exc: BaseException) -> None:
        if self.bad[position]:  # another worker found it first (and warned)
            return
        self.bad[position] = True
        warnings.warn(f"skipping unreadable image {self.describe_sample(position)}: {type(exc).__name__}: {exc}",
                      stacklevel=2)

    def _load(self, index: int, epoch: int) -> tuple[int, dict]:
        """``(position read, item)`` for sample ``index`` or, when it cannot be read, the next readable one
        (seeded as ``index``). A transform marked ``lazy`` (``data.fast_decode``) gets the undecoded image
        and decodes it itself; its decoding errors arrive as :class:`UnreadableImage`."""
        count = len(self.samples)
        window = count if self.replace_within is None else min(count, self.replace_within)
        lazy = bool(getattr(self.transform, "lazy", False))
        bad = self.bad.numpy()  # a view of the shared flags (cheap to test, for long runs of flagged files)
        start = index % count
        for offset in range(window):
            position = start + offset
            if position >= count:
                position -= count
            if bad[position]:
                continue
            try:
                image, label = self.open_lazy(position) if lazy else self.read(position)
            except self.unreadable as exc:
                self._flag_bad(position, exc)
                continue
            if not lazy:
                return position, transformed_item(self.transform, self.seed, epoch, index, image, label)
            try:
                return position, transformed_item(self.transform, self.seed, epoch, index, image, label)
            except UnreadableImage as exc:
                self._flag_bad(position, exc.cause)
        if self.num_bad() >= count:
            raise no_readable_images(self.key, self.value, count, count)
        raise RuntimeError(f"no readable image among {window} files starting at {self.describe_sample(index % count)}"
                           f"; {self.num_bad()} unreadable so far")

    def first_readable(self, limit: int | None = None) -> int | None:
        """Decode samples in list order until one reads; its position, or None when the first ``limit``
        (None: all) failed. The setup probe: normally the first file reads; it goes on as long as files fail
        (a bounded probe would call data with a long unreadable run at its start unreadable). The failures
        are flagged, and warned about only when a readable sample follows (a source that cannot be read at
        all is one error, not N warnings)."""
        count = len(self.samples)
        failed: list[tuple[int, BaseException]] = []
        found = None
        for position in range(count if limit is None else min(count, int(limit))):
            if self.bad[position]:
                continue
            try:
                self.read(position)
                found = position
                break
            except self.unreadable as exc:
                failed.append((position, exc))
        for position, exc in failed:
            if found is None:
                self.bad[position] = True
            else:
                self._flag_bad(position, exc)
        return found

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        position, item = self._load(int(index), int(epoch))
        if self.mark_replaced:
            item["valid"] = position == index % len(self.samples)
        return item
