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
from torchvision.transforms import functional as TF

from mim_lightning.errors import ConfigError
from mim_lightning.masking import MaskGenerator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


class UnreadableImage(Exception):
    """A lazily opened image failed to decode inside a transform (``data.fast_decode``): the dataset
    skips and counts the sample as it does when opening fails. ``cause`` is the decoder's exception."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


#: Decoder failures: a sample that raises one of these is unreadable (skipped and counted), not a bug.
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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


PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                "nearest": Image.Resampling.NEAREST}

#: DCT scale factors libjpeg can decode at (through ``Image.draft``), largest first.
DRAFT_FACTORS = (8, 4, 2)


def draft_factor(crop_height: float, crop_width: float, out_height: int, out_width: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2; 1: none) that keeps a ``crop_height x crop_width`` region
    at least ``out_height x out_width`` pixels, so the resize after it still only shrinks."""
    for factor in DRAFT_FACTORS:
        if crop_height / factor >= out_height and crop_width / factor >= out_width:
            return factor
    return 1


class DraftRandomResizedCrop(T.RandomResizedCrop):
    """``RandomResizedCrop`` that takes a lazily opened image and decodes it itself (``data.fast_decode``).

    The crop box is drawn from the image's header size exactly as torchvision draws it (same random
    draws, same box). A JPEG is then decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling
    (``Image.draft``) when the box, so reduced, still holds at least the output size, and the box is
    resized from the reduced image (``PIL.Image.resize`` with a fractional box). Other images, and crops
    too small to reduce, are decoded in full and cropped as ``RandomResizedCrop`` crops them (identical
    pixels). Decoding errors are raised as :class:`UnreadableImage`.
    """

    def __init__(self, *args, resample: str = "bicubic", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resample = PIL_RESAMPLE[resample]

    def forward(self, img: Image.Image) -> Image.Image:
        top, left, height, width = self.get_params(img, self.scale, self.ratio)
        full_width, full_height = img.size
        out_height, out_width = self.size
        factor = draft_factor(height, width, out_height, out_width)
        try:
            if factor > 1 and getattr(img, "format", None) == "JPEG" and getattr(img, "tile", None):
                img.draft("RGB", (-(-full_width // factor), -(-full_height // factor)))
            image = as_rgb(img)
        except DECODE_ERRORS as exc:
            raise UnreadableImage(exc) from exc
        if image.size == (full_width, full_height):
            return TF.resized_crop(image, top, left, height, width, self.size, self.interpolation, antialias=True)
        sx, sy = image.size[0] / full_width, image.size[1] / full_height
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        return image.resize((out_width, out_height), self.resample, box=box)


def interpolation_mode(name: str) -> T.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ConfigError("data.interpolation", name, ", ".join(INTERPOLATIONS))
    return INTERPOLATIONS[name]


def pretrain_image_transform(image_size: int | Sequence[int], scale: Sequence[float] = (0.2, 1.0),
                             ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                             interpolation: str = "bicubic", mean: Sequence[float] = IMAGENET_MEAN,
                             std: Sequence[float] = IMAGENET_STD, color_jitter: float = 0.0,
                             fast_decode: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """MAE's pretraining augmentation: RandomResizedCrop (bicubic, scale (0.2, 1)), horizontal flip,
    ToTensor, Normalize. ``color_jitter > 0`` first applies ``ColorJitter(v, v, v)`` (brightness,
    contrast, saturation), as BEiT/iTPN-CLIP do; MAE, SimMIM and MixMAE use none.

    ``fast_decode``: the crop is a :class:`DraftRandomResizedCrop`, which decodes JPEGs at a reduced
    scale when the crop allows it (the transform is then marked ``lazy``: it takes undecoded images).
    Colour jitter needs the whole decoded image first, so with ``color_jitter > 0`` it has no effect."""
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ConfigError("data.crop_scale", list(scale), "two numbers 0 < low <= high <= 1, e.g. [0.2, 1.0]")
    if not isinstance(color_jitter, (int, float)) or color_jitter < 0:
        raise ConfigError("data.color_jitter", color_jitter, "a number >= 0 (0 = off; iTPN-CLIP uses 0.4)")
    jitter = [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []
    lazy = bool(fast_decode) and not jitter
    crop = (DraftRandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio),
                                   interpolation=interpolation_mode(interpolation), resample=interpolation) if lazy else
            T.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=interpolation_mode(interpolation)))
    compose = T.Compose([
        *jitter,
        crop,
        T.RandomHorizontalFlip(hflip),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    compose.lazy = lazy
    return compose


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
        #: True when the image transform decodes the image itself (it takes lazily opened images).
        self.lazy = bool(getattr(image_transform, "lazy", False))

    def __call__(self, image: Image.Image, seed: np.random.SeedSequence) -> tuple[torch.Tensor, np.ndarray | None]:
        image_seed, mask_seed = seed.spawn(2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(image_seed.generate_state(1, dtype=np.uint64)[0]))
            tensor = self.image_transform(image)
        mask = None if self.mask_generator is None else self.mask_generator(np.random.default_rng(mask_seed))
        return tensor, mask
