"""The pretraining DataModule: a source of images, a train/val split, and mask-generating transforms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from mim_lightning.data.datasets import ImageDataset
from mim_lightning.data.sampler import EpochIndexSampler, ResumableDataLoader
from mim_lightning.data.sources import ImageFolderSource, Sample
from mim_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MIMTransform, eval_image_transform, pretrain_image_transform
from mim_lightning.errors import ConfigError
from mim_lightning.masking import MaskGenerator


def collate_batch_mask(items: list[dict]) -> dict:
    """Collate, keeping one mask for the whole batch (the first sample's): ``mask`` is (1, gh, gw)."""
    batch = default_collate(items)
    if "mask" in batch:
        batch["mask"] = batch["mask"][:1]
    return batch


def split_train_val(samples: Sequence[Sample], val_fraction: float, val_max: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded, deterministic split; at least one validation image when ``val_fraction > 0`` and
    there are two or more images, and never all of them."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("data.val_fraction", val_fraction, "a number in [0, 1), e.g. 0.01")
    count = len(samples)
    num_val = min(int(round(count * val_fraction)), int(val_max), count - 1)
    if val_fraction > 0 and count >= 2:
        num_val = max(num_val, 1)
    order = np.random.default_rng(seed).permutation(count)
    val_ids = set(order[:num_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_ids]
    val = [s for i, s in enumerate(samples) if i in val_ids]
    return train, val


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


class PretrainDataModule(TrainPositionState, pl.LightningDataModule):
    """Images for self-supervised pretraining, with the method's mask drawn in the transform.

    Args:
        source: where the images are (``ImageFolderSource``, ``ClassFolderSource``, ``DemoSource``).
        root: the folder to read, given as ``data.root=...``; replaces the source's own root when set.
        image_size: crop size in pixels.
        batch_size: per-device batch size.
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader settings (pinning only
            when CUDA is present; persistence and prefetch only with workers).
        val_fraction, val_max_images: held-out images for ``val/loss`` (centre crops, fixed masks).
        repeat: passes over the image list per epoch (for tiny datasets; each pass has new crops/masks).
        crop_scale, crop_ratio, hflip, interpolation, mean, std, color_jitter: the augmentation (MAE's by
            default; ``color_jitter`` 0 is off).
        seed: the run seed; data order, crops and masks derive from it.
        mask_generator: draws each sample's mask (None: the model draws its own).
    """

    def __init__(self, source: ImageFolderSource, root: str | None = None, image_size: int = 224, batch_size: int = 64, num_workers: int = 8,
                 pin_memory: bool = True, persistent_workers: bool = True, prefetch_factor: int | None = 2,
                 val_fraction: float = 0.01, val_max_images: int = 1000, repeat: int = 1,
                 crop_scale: Sequence[float] = (0.2, 1.0), crop_ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bicubic", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 seed: int = 0, mask_generator: MaskGenerator | None = None, color_jitter: float = 0.0) -> None:
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
        self.repeat = int(repeat)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.seed = int(seed)
        self.mask_generator = mask_generator
        self.train_transform = MIMTransform(
            pretrain_image_transform(image_size, crop_scale, crop_ratio, hflip, interpolation, self.mean, self.std,
                                     color_jitter), mask_generator)
        self.val_transform = MIMTransform(eval_image_transform(image_size, interpolation, self.mean, self.std), mask_generator)
        self._train_loader: ResumableDataLoader | None = None
        self._resume_state: dict | None = None
        self.train_dataset: ImageDataset | None = None
        self.val_dataset: ImageDataset | None = None
        self.classes: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        samples = self.source.samples()
        self.classes = list(self.source.classes)
        train, val = split_train_val(samples, self.val_fraction, self.val_max_images, self.seed)
        self.train_dataset = ImageDataset(train, self.train_transform, seed=self.seed, repeat=self.repeat)
        self.val_dataset = ImageDataset(val, self.val_transform, seed=self.seed + 1) if val else None
        self._check_batch_size(world_size=self._rank_and_world()[1])

    def _check_batch_size(self, world_size: int) -> None:
        assert self.train_dataset is not None
        per_rank = len(self.train_dataset) // world_size
        if per_rank < self.batch_size:
            raise ConfigError(
                "data.batch_size", self.batch_size,
                f"at most the {per_rank} training images per device (lower data.batch_size or raise data.repeat)",
                "larger than the training set, so an epoch would have no batch")

    def num_skipped(self) -> int:
        """Unreadable files found so far (skipped, not fatal)."""
        return sum(ds.num_bad() for ds in (self.train_dataset, self.val_dataset) if ds is not None)

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

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        self._check_batch_size(world_size=self._rank_and_world()[1])
        return self._track_train_loader(self._loader(self.train_dataset, shuffle=True, drop_last=True, resumable=True))

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, shuffle=False, drop_last=False)
