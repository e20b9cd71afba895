"""The pretraining DataModule over any source: a train/val split (:mod:`mim_lightning.data.split`),
mask-generating transforms, the loaders.

Every indexed source (:class:`~mim_lightning.data.sources.Source`) goes through
:class:`~mim_lightning.data.datasets.ImageDataset` (per-sample seeding, unreadable-sample skipping),
:class:`~mim_lightning.data.sampler.EpochIndexSampler` (rank split, equal batches per rank) and
:class:`~mim_lightning.data.sampler.ResumableDataLoader` (exact mid-epoch resume); a stream source through
:mod:`mim_lightning.data.stream`. Nothing here depends on which source it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, default_collate

from mim_lightning import runlog
from mim_lightning.data.datasets import ImageDataset, no_readable_images
from mim_lightning.data.sampler import EpochIndexSampler, ResumableDataLoader, TrainPositionState
from mim_lightning.data.sources import Sample, Source
from mim_lightning.data.split import held_out_count, split_train_val
from mim_lightning.data.stream import StreamDataset, StreamLoader
from mim_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MIMTransform, eval_image_transform, pretrain_image_transform
from mim_lightning.errors import ConfigError
from mim_lightning.masking import MaskGenerator


def collate_batch_mask(items: list[dict]) -> dict:
    """Collate, keeping one mask for the whole batch (the first sample's): ``mask`` is (1, gh, gw)."""
    batch = default_collate(items)
    if "mask" in batch:
        batch["mask"] = batch["mask"][:1]
    return batch


def _all_reduce(tensor: torch.Tensor, op: str, trainer: Any = None) -> torch.Tensor:
    """``tensor`` reduced over the ranks (``op``: ``max`` or ``sum``) when a process group of more than one
    rank is running (a collective: every rank must call it); ``tensor`` itself otherwise."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = trainer.strategy.root_device if trainer is not None else torch.device("cuda", torch.cuda.current_device())
    merged = tensor.to(device)
    dist.all_reduce(merged, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return merged.cpu()


def union_count(flags: Sequence[torch.Tensor], trainer: Any = None) -> int:
    """How many samples are flagged in any rank's ``flags`` (bool tensors, the same samples on every rank);
    see :func:`_all_reduce` (a collective under DDP)."""
    flags = [f.reshape(-1) for f in flags if f is not None and f.numel()]
    if not flags:
        return 0
    return int(_all_reduce(torch.cat([f.to(torch.uint8) for f in flags]), "max", trainer).sum())


def total_count(count: int, trainer: Any = None) -> int:
    """``count`` summed over the ranks (a collective under DDP, see :func:`_all_reduce`)."""
    return int(_all_reduce(torch.tensor([int(count)], dtype=torch.int64), "sum", trainer).item())


def source_text(source: Any, count: int | None = None) -> str:
    """A source in words, for run summaries (``folder /data/pets``, ``demo photos (17 images ...)``)."""
    describe = getattr(source, "describe", None)
    if callable(describe):
        return str(describe())
    return f"{type(source).__name__} {getattr(source, 'root', '')}".strip()


def check_readable(train: ImageDataset, val: ImageDataset | None, key: str, value: Any) -> ImageDataset | None:
    """The setup probe: a one-line :class:`~mim_lightning.errors.ConfigError` when no training file decodes
    (files are tried in order until one reads: normally the first, so big folders are not decoded; a long
    run of unreadable files at the start is read through, not taken for unreadable data); the validation
    set likewise, dropped with a warning when none of it decodes. Returns ``val``."""
    val_readable = None
    if train.first_readable() is None:
        tried, total = len(train.samples), len(train.samples)
        val_readable = val.first_readable(None) if val is not None else None
        if val_readable is None and val is not None:
            tried, total = tried + len(val.samples), total + len(val.samples)
        raise no_readable_images(key, value, tried, total, "" if val_readable is None else "training ")
    if val is not None and val.first_readable(None) is None:
        runlog.warning(f"no readable held-out image (all {len(val.samples)} failed to decode): validation is off")
        return None
    return val


class PretrainDataModule(TrainPositionState, pl.LightningDataModule):
    """Images for self-supervised pretraining, with the method's mask drawn in the transform.

    Args:
        source: where the images are: any :class:`~mim_lightning.data.sources.Source` (folder, class folders,
            demo, Fashion-MNIST, Hugging Face rows, tar shards) or a stream source (Hugging Face streaming).
        root: the folder to read, given as ``data.root=...``; replaces the source's own root when set.
        image_size: crop size in pixels.
        batch_size: per-device batch size.
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader settings (pinning only
            when CUDA is present; persistence and prefetch only with workers).
        val_fraction, val_min_images, val_max_images: held-out images for ``val/loss`` (centre crops, fixed
            masks): ``round(n * val_fraction)``, at least ``val_min_images``, at most ``val_max_images`` and
            half the images (:func:`held_out_count`); class-stratified for labelled sources. 0: no validation.
        repeat: passes over the image list per epoch (for tiny datasets; each pass has new crops/masks).
        crop_scale, crop_ratio, hflip, interpolation, mean, std, color_jitter: the augmentation (MAE's by
            default; ``color_jitter`` 0 is off).
        seed: the run seed; data order, crops and masks derive from it.
        mask_generator: draws each sample's mask (None: the model draws its own).
        fast_decode: decode JPEGs at 1/2, 1/4 or 1/8 scale when the random crop allows it (libjpeg DCT
            scaling through ``Image.draft``; see :class:`~mim_lightning.data.transforms.DraftRandomResizedCrop`).
            Off by default: the pixels differ slightly from full decoding (docs/architecture.md, Data).
    """

    def __init__(self, source: Source, root: str | None = None, image_size: int = 224, batch_size: int = 64, num_workers: int = 8,
                 pin_memory: bool = True, persistent_workers: bool = True, prefetch_factor: int | None = 2,
                 val_fraction: float = 0.01, val_max_images: int = 1000, repeat: int = 1,
                 crop_scale: Sequence[float] = (0.2, 1.0), crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bicubic", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 seed: int = 0, mask_generator: MaskGenerator | None = None, color_jitter: float = 0.0,
                 val_min_images: int = 8, fast_decode: bool = False) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ConfigError("data.batch_size", batch_size, "a positive integer")
        if int(num_workers) < 0:
            raise ConfigError("data.num_workers", num_workers, "0 or more")
        if root is not None:
            source.root = root
        self.source = source
        self.image_size = image_size
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        self.val_fraction = float(val_fraction)
        self.val_max_images = int(val_max_images)
        self.val_min_images = int(val_min_images)
        held_out_count(0, self.val_fraction, self.val_min_images, self.val_max_images)  # one-line errors now
        self.repeat = int(repeat)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.seed = int(seed)
        self.mask_generator = mask_generator
        self.fast_decode = bool(fast_decode)
        self.train_transform = MIMTransform(
            pretrain_image_transform(image_size, crop_scale, crop_ratio, hflip, interpolation, self.mean, self.std,
                                     color_jitter, fast_decode=self.fast_decode), mask_generator)
        #: The deterministic view (resize + centre crop), without a mask: probes and previews.
        self.eval_view = MIMTransform(eval_image_transform(image_size, interpolation, self.mean, self.std), None)
        self.val_transform = MIMTransform(self.eval_view.image_transform, mask_generator)
        self._train_loader: ResumableDataLoader | StreamLoader | None = None
        self._resume_state: dict | None = None
        self._epoch = 0
        self.train_dataset: ImageDataset | StreamDataset | None = None
        self.val_dataset: ImageDataset | None = None
        self.val_source: Source | None = None
        self.classes: list[str] = []

    @property
    def streaming(self) -> bool:
        """Whether the source is a stream (no sample list, no held-out split)."""
        return bool(getattr(self.source, "streaming", False))

    @property
    def labelled(self) -> bool:
        """Whether the samples carry labels (after ``setup``): probes and finetuning need them."""
        return bool(self.classes) and bool(getattr(self.source, "labelled", False))

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if self.streaming:
            self.classes = list(self.source.classes)
            self.train_dataset = StreamDataset(self.source, self.train_transform, seed=self.seed)
            self._check_batch_size(world_size=self._rank_and_world()[1])
            return
        samples = self.source.samples()
        self.classes = list(self.source.classes)
        train, val = self.split_samples(samples)
        self._make_datasets(train, val)

    def probe_datasets(self, max_train: int | None = None, max_held_out: int | None = None
                       ) -> tuple[ImageDataset, ImageDataset] | None:
        """Labelled ``(train, held_out)`` datasets for representation probes, after ``setup``: the first
        ``max_train`` training and ``max_held_out`` held-out samples through the deterministic view (resize +
        centre crop, no mask), read by the source like the training data. None when the data has no labels,
        no held-out split, or is a stream (the reason is in :attr:`probe_unavailable`)."""
        self.setup("fit")
        reason = None
        if not self.labelled:
            reason = "the data has no labels (e.g. data=imagefolder, data=fashion_mnist, labelled shards or data=hf " \
                     "with data.source.label_column)"
        elif self.streaming:
            reason = "a streamed source has no held-out split"
        elif self.val_dataset is None:
            reason = "no held-out split (data.val_fraction=0)"
        self.probe_unavailable = reason
        if reason is not None:
            return None
        train = self.train_dataset.samples[: max_train] if max_train is not None else self.train_dataset.samples
        held_out = self.val_dataset.samples[: max_held_out] if max_held_out is not None else self.val_dataset.samples
        return (ImageDataset(train, self.eval_view, seed=0, replace_within=None, source=self.train_dataset.source),
                ImageDataset(held_out, self.eval_view, seed=0, replace_within=None, source=self.val_dataset.source))

    def split_samples(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
        """The seeded train/val split of ``samples`` (see :func:`split_train_val`)."""
        return split_train_val(samples, self.val_fraction, self.val_max_images, self.seed, val_min=self.val_min_images)

    def _source_key(self) -> tuple[str, Any]:
        """The config key and value naming where the images are (for one-line errors)."""
        return str(getattr(self.source, "key", "data.root")), getattr(self.source, "root", None)

    def _dataset(self, samples: Sequence[Sample], train: bool) -> ImageDataset:
        key, value = self._source_key()
        if train:
            return ImageDataset(samples, self.train_transform, seed=self.seed, repeat=self.repeat, key=key, value=value,
                                source=self.source)
        return ImageDataset(samples, self.val_transform, seed=self.seed + 1, replace_within=None, mark_replaced=True,
                            key=key, value=value, source=self.val_source or self.source)

    def _make_datasets(self, train: Sequence[Sample], val: Sequence[Sample]) -> None:
        """Build the datasets, probe that they can be read (:func:`check_readable`), check the batch size."""
        self.train_dataset = self._dataset(train, train=True)
        val_dataset = self._dataset(val, train=False) if val else None
        self.val_dataset = check_readable(self.train_dataset, val_dataset, *self._source_key())
        self._check_batch_size(world_size=self._rank_and_world()[1])

    def describe(self) -> dict[str, Any]:
        """What the run reads, after ``setup("fit")``: ``{"source", "demo", "images", "train", "val",
        "classes", "skipped", "repeat"}`` (``train``/``val``: images, before ``repeat``; ``skipped``: this
        rank's unreadable files so far). A stream has ``images``/``train`` None and ``val`` 0."""
        indexed = self.train_dataset is not None and not self.streaming
        train = len(self.train_dataset.samples) if indexed else None
        val = len(self.val_dataset.samples) if self.val_dataset is not None else 0
        return {"source": source_text(self.source), "demo": bool(getattr(self.source, "demo", False)),
                "images": None if train is None else train + val, "train": train, "val": val,
                "classes": len(self.classes), "skipped": self._local_skipped(), "repeat": self.repeat}

    def _check_batch_size(self, world_size: int) -> None:
        assert self.train_dataset is not None
        if self.streaming:
            if self.source.epoch_size // world_size < self.batch_size:
                raise ConfigError("data.batch_size", self.batch_size,
                                  f"at most data.source.epoch_size / devices = {self.source.epoch_size // world_size}")
            return
        per_rank = len(self.train_dataset) // world_size
        if per_rank < self.batch_size:
            raise ConfigError(
                "data.batch_size", self.batch_size,
                f"at most the {per_rank} training images per device (lower data.batch_size or raise data.repeat)",
                "larger than the training set, so an epoch would have no batch")

    def _bad_flags(self) -> list[torch.Tensor]:
        return [ds.bad for ds in (self.train_dataset, self.val_dataset) if ds is not None]

    def _local_skipped(self) -> int:
        return sum(int(flags.sum()) for flags in self._bad_flags())

    def num_skipped(self) -> int:
        """Distinct unreadable samples found so far (skipped, not fatal), by every loader worker and, when a
        process group runs, every rank (then a collective: call it on all ranks, as an epoch-end hook does).
        A stream counts every unreadable row read (rows have no stable ids)."""
        if self.streaming:
            return total_count(self._local_skipped(), self.trainer)
        return union_count(self._bad_flags(), self.trainer)

    def set_epoch(self, epoch: int) -> None:
        """The epoch a stream reads when there is no trainer (scripts, tests)."""
        self._epoch = int(epoch)

    def _current_epoch(self) -> int:
        return self._epoch if self.trainer is None else int(self.trainer.current_epoch)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _batches_done(self) -> int:
        """Training batches finished in the current epoch (Lightning's progress counter)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def _loader(self, dataset: ImageDataset, shuffle: bool, drop_last: bool, resumable: bool = False) -> DataLoader:
        rank, world = self._rank_and_world()
        sampler = EpochIndexSampler(len(dataset), shuffle=shuffle, seed=self.seed, rank=rank, world_size=world)
        workers = self.num_workers
        extra: dict[str, Any] = {}
        if workers > 0:
            extra["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                extra["prefetch_factor"] = int(self.prefetch_factor)
        if getattr(self.mask_generator, "per_batch", False):
            extra["collate_fn"] = collate_batch_mask
        if resumable:
            extra["progress"] = self._batches_done
        loader_class = ResumableDataLoader if resumable else DataLoader
        # Its own generator: creating an iterator draws a worker base seed, which must not advance the
        # global torch RNG (a resumed run creates iterators at other points than an uninterrupted one, and
        # model-side draws such as drop-path use the global stream). Samples are seeded per index anyway.
        extra["generator"] = torch.Generator().manual_seed(self.seed)
        return loader_class(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=workers,
                            pin_memory=self.pin_memory and torch.cuda.is_available(), drop_last=drop_last, **extra)

    def _stream_loader(self) -> StreamLoader:
        rank, world = self._rank_and_world()
        extra: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            extra["prefetch_factor"] = int(self.prefetch_factor)
        collate = collate_batch_mask if getattr(self.mask_generator, "per_batch", False) else default_collate
        return StreamLoader(self.train_dataset, self.source.epoch_size, rank, world, epoch_fn=self._current_epoch,
                            progress=self._batches_done, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate, pin_memory=self.pin_memory and torch.cuda.is_available(), **extra)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        self._check_batch_size(world_size=self._rank_and_world()[1])
        if self.streaming:
            return self._track_train_loader(self._stream_loader())
        return self._track_train_loader(self._loader(self.train_dataset, shuffle=True, drop_last=True, resumable=True))

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, shuffle=False, drop_last=False)
