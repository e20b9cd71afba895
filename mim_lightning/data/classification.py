"""Labelled images for finetuning and linear probing.

The ``data`` group is the same as for pretraining (``data=imagefolder data.root=...``: one sub-folder per
class); the finetuning recipe (``finetune.augment``) picks the augmentation:

- finetune: timm ``create_transform(is_training=True)``: RandomResizedCrop (scale 0.08-1, bicubic), flip,
  RandAugment (``rand-m9-mstd0.5-inc1``), random erasing (``reprob`` 0.25, mode ``pixel``), as MAE's
  ``build_transform``; Mixup/CutMix run on the batch in the module.
- linear probe: RandomResizedCrop (bicubic, scale 0.08-1) + flip (MAE ``main_linprobe.py``; torchvision's crop
  instead of MAE's TF-style crop without retries).
- eval: Resize(image_size / crop_pct, bicubic) + CenterCrop(image_size); ``crop_pct`` null = 224/256 up to 224px
  and 1.0 above, as MAE.

Every sample is seeded by ``(seed, epoch, index)``: the torch, ``random`` and numpy generators that timm's
RandAugment and random erasing draw from are re-seeded per sample (and restored afterwards).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision import transforms as T

from mim_lightning.data.datamodule import PretrainDataModule
from mim_lightning.data.sources import ClassFolderSource, Source
from mim_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, interpolation_mode
from mim_lightning.errors import ConfigError


class SeededTransform:
    """``transform(image, seed) -> (tensor, None)``: ``image_transform`` run under torch, ``random`` and
    numpy generators seeded from ``seed`` (the caller's generator states are restored)."""

    def __init__(self, image_transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.image_transform = image_transform
        self.mask_generator = None

    def __call__(self, image: Image.Image, seed: np.random.SeedSequence) -> tuple[torch.Tensor, None]:
        state = seed.generate_state(3, dtype=np.uint32)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(int(state[1]))
            np.random.seed(int(state[2]))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(state[0]))
                tensor = self.image_transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return tensor, None


def eval_crop_size(image_size: int, crop_pct: float | None) -> int:
    """The resize before the centre crop: ``int(image_size / crop_pct)`` (MAE: crop_pct 224/256 up to 224px)."""
    if crop_pct is None:
        crop_pct = 224 / 256 if image_size <= 224 else 1.0
    if not 0 < float(crop_pct) <= 1:
        raise ConfigError("finetune.augment.crop_pct", crop_pct, "a number in (0, 1], or null (224/256 as MAE)")
    return int(image_size / float(crop_pct))


def classification_eval_transform(image_size: int, crop_pct: float | None = None, interpolation: str = "bicubic",
                                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    return T.Compose([T.Resize(eval_crop_size(image_size, crop_pct), interpolation=interpolation_mode(interpolation)),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


def classification_train_transform(image_size: int, mode: str = "finetune", auto_augment: str | None = None,
                                   color_jitter: float | None = None, reprob: float = 0.0, remode: str = "pixel",
                                   recount: int = 1, interpolation: str = "bicubic",
                                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                                   scale: Sequence[float] | None = None):
    """timm's training transform (finetune) or RandomResizedCrop + flip (linear probe).

    ``scale``: the RandomResizedCrop area range; null keeps the official (0.08, 1) (small images such as
    Fashion-MNIST want a milder one, e.g. [0.5, 1]).
    """
    if scale is not None:
        scale = tuple(float(s) for s in scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError("finetune.augment.scale", list(scale), "[min, max] with 0 < min <= max <= 1, or null")
    if mode == "linear_probe":
        return T.Compose([T.RandomResizedCrop(image_size, scale=scale or (0.08, 1.0),
                                              interpolation=interpolation_mode(interpolation)),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    from timm.data import create_transform

    interpolation_mode(interpolation)  # one-line error for a bad name
    try:
        return create_transform(input_size=image_size, is_training=True, color_jitter=color_jitter,
                                auto_augment=auto_augment, interpolation=interpolation, re_prob=float(reprob),
                                re_mode=remode, re_count=int(recount), mean=tuple(mean), std=tuple(std),
                                scale=scale)
    except (AssertionError, ValueError, KeyError) as exc:
        raise ConfigError("finetune.augment", auto_augment, "a timm auto_augment string, e.g. rand-m9-mstd0.5-inc1",
                          str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


class ClassificationDataModule(PretrainDataModule):
    """Labelled images (``items: images, label, index``) with the finetuning or probing augmentation.

    Args:
        source: any labelled source (class folders, Fashion-MNIST, labelled shards, Hugging Face rows with a
            label column); an unlabelled one is a one-line ConfigError.
        val_root: a separate folder of the same classes for validation (ImageNet ``val/``); without it
            ``val_fraction`` of the training images are held out (at least ``val_min_images``, at most
            ``val_max_images`` and half; class-stratified: every class gives its share and keeps one image).
        mode: ``finetune`` or ``linear_probe`` (picks the training transform).
        augment: the recipe's ``finetune.augment`` mapping (auto_augment, color_jitter, reprob, remode,
            recount, interpolation, crop_pct).
        The other arguments are :class:`~mim_lightning.data.datamodule.PretrainDataModule`'s.
    """

    def __init__(self, source: Source, root: str | None = None, val_root: str | None = None,
                 mode: str = "finetune", augment: Mapping[str, Any] | None = None, image_size: int = 224,
                 batch_size: int = 64, num_workers: int = 8, pin_memory: bool = True, persistent_workers: bool = True,
                 prefetch_factor: int | None = 2, val_fraction: float = 0.01, val_max_images: int = 1000,
                 repeat: int = 1, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 seed: int = 0, interpolation: str = "bicubic", val_min_images: int = 8) -> None:
        if not getattr(source, "labelled", False):
            raise ConfigError("data", type(source).__name__, "a labelled source: data=imagefolder data.root=<folder "
                              "with one sub-folder per class>", "finetuning needs labels")
        if not isinstance(image_size, int):
            raise ConfigError("data.image_size", image_size, "one integer (square crops) for finetuning")
        super().__init__(source, root=root, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent_workers, prefetch_factor=prefetch_factor,
                         val_fraction=val_fraction, val_max_images=val_max_images, repeat=repeat,
                         interpolation=interpolation, mean=mean, std=std, seed=seed, val_min_images=val_min_images)
        augment = dict(augment or {})
        interp = str(augment.pop("interpolation", interpolation))
        crop_pct = augment.pop("crop_pct", None)
        self.val_root = val_root
        self.train_transform = SeededTransform(classification_train_transform(
            image_size, mode, interpolation=interp, mean=self.mean, std=self.std, **augment))
        self.val_transform = SeededTransform(classification_eval_transform(image_size, crop_pct, interp, self.mean,
                                                                           self.std))

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        samples = self.source.samples()
        self.classes = list(self.source.classes)
        if self.val_root is not None:
            val_source = ClassFolderSource(self.val_root, key="val_root")
            if val_source.class_names() != self.classes:
                raise ConfigError("val_root", str(self.val_root), f"the same class sub-folders as data.root "
                                  f"({len(self.classes)}: {', '.join(self.classes[:3])}...)", "the class lists differ")
            train, val = list(samples), val_source.samples()
            self.val_source = val_source
        else:
            train, val = self.split_samples(samples)
        self._make_datasets(train, val)


#: ``data`` keys that are pretraining augmentation and do not apply to finetuning.
PRETRAIN_ONLY_KEYS = ("_target_", "source", "crop_scale", "crop_ratio", "hflip", "color_jitter", "fast_decode")


def labelled_source(cfg: DictConfig) -> Source:
    """The ``data`` group's source with ``data.root`` set; a ConfigError when it has no labels."""
    from mim_lightning.instantiate import instantiate_checked

    source = instantiate_checked(cfg.data.source)
    if not getattr(source, "labelled", False):
        raise ConfigError("data", type(source).__name__, "a labelled source: data=imagefolder data.root=<folder with "
                          "one sub-folder per class>", "finetuning needs labels")
    if cfg.data.get("root") is not None:
        source.root = cfg.data.root
    return source


def build_classification_datamodule(cfg: DictConfig) -> ClassificationDataModule:
    """The finetuning DataModule of a composed ``conf/finetune.yaml`` (its ``data`` group plus the recipe's
    ``finetune.augment``, ``mode`` and ``val_root``)."""
    from mim_lightning.instantiate import to_container

    data = {k: v for k, v in to_container(cfg.data).items() if k not in PRETRAIN_ONLY_KEYS}
    augment = to_container(cfg.finetune.augment) if cfg.finetune.get("augment") is not None else {}
    return ClassificationDataModule(labelled_source(cfg), val_root=cfg.get("val_root"), mode=str(cfg.get("mode", "finetune")),
                                    augment=augment, **data)
