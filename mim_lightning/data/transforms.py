"""Per-sample transforms: augment the image and draw its mask from one seed.

Each sample is seeded by ``(seed, epoch, index)``, so the crops and masks of a run do not depend
on the number of workers, on which worker loads which sample, or on where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from mim_lightning.errors import ConfigError
from mim_lightning.masking import MaskGenerator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def interpolation_mode(name: str) -> T.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ConfigError("data.interpolation", name, ", ".join(INTERPOLATIONS))
    return INTERPOLATIONS[name]


def pretrain_image_transform(image_size: int | Sequence[int], scale: Sequence[float] = (0.2, 1.0),
                             ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                             interpolation: str = "bicubic", mean: Sequence[float] = IMAGENET_MEAN,
                             std: Sequence[float] = IMAGENET_STD, color_jitter: float = 0.0
                             ) -> Callable[[Image.Image], torch.Tensor]:
    """MAE's pretraining augmentation: RandomResizedCrop (bicubic, scale (0.2, 1)), horizontal flip,
    ToTensor, Normalize. ``color_jitter > 0`` first applies ``ColorJitter(v, v, v)`` (brightness,
    contrast, saturation), as BEiT/iTPN-CLIP do; MAE, SimMIM and MixMAE use none."""
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ConfigError("data.crop_scale", list(scale), "two numbers 0 < low <= high <= 1, e.g. [0.2, 1.0]")
    if not isinstance(color_jitter, (int, float)) or color_jitter < 0:
        raise ConfigError("data.color_jitter", color_jitter, "a number >= 0 (0 = off; iTPN-CLIP uses 0.4)")
    jitter = [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []
    return T.Compose([
        *jitter,
        T.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=interpolation_mode(interpolation)),
        T.RandomHorizontalFlip(hflip),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_image_transform(image_size: int | Sequence[int], interpolation: str = "bicubic",
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                         ) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic view for validation: resize the shorter side to the crop size, centre crop."""
    size = image_size if isinstance(image_size, int) else tuple(image_size)
    return T.Compose([
        T.Resize(size if isinstance(size, int) else min(size), interpolation=interpolation_mode(interpolation)),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class MIMTransform:
    """Image transform plus mask generator, both driven by one per-sample ``SeedSequence``.

    ``transform(image, seed) -> (tensor (3, H, W), mask (gh, gw) bool numpy or None)``.
    The torchvision transform runs under a forked, re-seeded torch RNG, so it draws the same crop for
    the same seed in any process without disturbing the global RNG.
    """

    def __init__(self, image_transform: Callable[[Image.Image], torch.Tensor], mask_generator: MaskGenerator | None = None) -> None:
        self.image_transform = image_transform
        self.mask_generator = mask_generator

    def __call__(self, image: Image.Image, seed: np.random.SeedSequence) -> tuple[torch.Tensor, np.ndarray | None]:
        image_seed, mask_seed = seed.spawn(2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(image_seed.generate_state(1, dtype=np.uint64)[0]))
            tensor = self.image_transform(image)
        mask = None if self.mask_generator is None else self.mask_generator(np.random.default_rng(mask_seed))
        return tensor, mask
