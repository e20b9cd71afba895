"""Mask generators.

Every generator returns a boolean grid, ``True`` = hidden, on the grid of *model patches*: the grid
the method's model consumes (:class:`~mim_lightning.models.output.MIMOutput` hands it back as
``output.mask``), e.g. 14x14 for a 16px ViT at 224px. Masks are drawn on a coarser grid of *mask
units* (``unit`` pixels, a multiple of the model patch) and expanded, which is how SimMIM builds
its 32px masks for a 4px Swin patch; MAE is the special case ``unit == patch_size``.

Generators are plain classes driven by a ``numpy.random.Generator``, so the data transform can
seed them per sample (``(seed, epoch, index)``) and a mask stream is reproducible across machines,
worker counts and resumes. :meth:`MaskGenerator.draw` is the in-model draw of the same rule for a
model called with ``mask=None``: on the device in torch where the rule allows it (:func:`random_mask`,
MAE's ``random_masking``; SimMIM's and MixMAE's counts), so one generator instance serves both the data
transform and the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mim_lightning.errors import ConfigError
from mim_lightning.geometry import check_divisible, check_ratio, to_pair


class MaskGenerator:
    """Base class: a per-sample mask on the model-patch grid, drawn on the mask-unit grid.

    Args:
        input_size: image size in pixels (int or (H, W)).
        patch_size: the model's patch size in pixels; the returned grid is ``input_size / patch_size``.
        ratio: the fraction of mask units to hide, in (0, 1).
        unit: the mask unit in pixels, a multiple of ``patch_size`` (default: ``patch_size``).
        per_batch: one mask for the whole batch (MixMAE) instead of one per sample; the DataModule then
            keeps the first sample's mask and hands the model a ``(1, gh, gw)`` mask.
    """

    def __init__(self, input_size: int | Sequence[int], patch_size: int, ratio: float, unit: int | None = None,
                 per_batch: bool = False) -> None:
        self.per_batch = bool(per_batch)
        self.ratio = check_ratio(ratio)
        self.patch_size = int(patch_size)
        self.unit = int(unit) if unit is not None else self.patch_size
        self.input_size = check_divisible(input_size, self.patch_size, "data.image_size", "backbone.patch_size")
        if self.unit <= 0 or self.unit % self.patch_size:
            raise ConfigError(
                "mask.unit", self.unit, f"a multiple of the model patch size {self.patch_size} "
                f"({self.patch_size}, {2 * self.patch_size}, {4 * self.patch_size}, ...)", "not a multiple of the patch")
        check_divisible(self.input_size, self.unit, "data.image_size", "mask.unit")
        self.scale = self.unit // self.patch_size
        self.unit_grid = (self.input_size[0] // self.unit, self.input_size[1] // self.unit)
        self.grid = (self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size)
        self.num_units = self.unit_grid[0] * self.unit_grid[1]
        self.num_hidden_units = self._hidden_count()
        if self.num_units < 2:
            raise ConfigError(
                "mask.unit", self.unit, f"a mask unit smaller than data.image_size={self.input_size[0]}, e.g. "
                f"mask.unit={self.patch_size}, or larger images", f"mask.unit={self.unit} gives "
                f"{self.num_units} mask unit on the {self.input_size[0]}x{self.input_size[1]} image: nothing to "
                "split into hidden and visible")
        if not 0 < self.num_hidden_units < self.num_units:
            raise ConfigError(
                "mask.ratio", self.ratio, f"a ratio that hides between 1 and {self.num_units - 1} of the "
                f"{self.num_units} mask units", f"hides {self.num_hidden_units} of {self.num_units} units")

    def _hidden_count(self) -> int:
        raise NotImplementedError

    def sample_units(self, rng: np.random.Generator) -> np.ndarray:
        """A bool array of shape ``unit_grid`` with exactly ``num_hidden_units`` True."""
        raise NotImplementedError

    @property
    def num_hidden(self) -> int:
        """Hidden model patches per mask (the ratio actually applied is ``num_hidden / prod(grid)``)."""
        return self.num_hidden_units * self.scale * self.scale

    @property
    def applied_ratio(self) -> float:
        return self.num_hidden_units / self.num_units

    def expand(self, units: np.ndarray) -> np.ndarray:
        """Unit grid -> model-patch grid (each unit becomes ``scale x scale`` patches)."""
        if self.scale == 1:
            return units
        return units.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng if rng is not None else np.random.default_rng()
        return self.expand(self.sample_units(rng))

    @property
    def fixed_hidden(self) -> int | None:
        """Hidden model patches in every mask :meth:`draw` makes, None when the count varies per mask."""
        return self.num_hidden

    def draw(self, batch: int, device: torch.device | str | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The masks of a model called with ``mask=None``: bool ``(batch, gh, gw)`` on ``device`` (one
        ``(1, gh, gw)`` mask with ``per_batch``), True = hidden, drawn from the torch RNG (``generator``, else
        the global one) so that seeding torch makes them reproducible.

        This rule has no torch form: the numpy draw of :meth:`__call__`, seeded by one integer from the torch
        RNG, copied to ``device`` without blocking.
        """
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item()))
        count = 1 if self.per_batch else batch
        return torch.from_numpy(np.stack([self(rng) for _ in range(count)])).to(device, non_blocking=True)

    def expand_units(self, units: torch.Tensor) -> torch.Tensor:
        """Torch :meth:`expand`: (B, *unit_grid) -> (B, *grid)."""
        if self.scale == 1:
            return units
        return units.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={self.input_size}, patch_size={self.patch_size}, "
                f"unit={self.unit}, ratio={self.ratio}, grid={self.grid}, hidden={self.num_hidden})")


class RandomMask(MaskGenerator):
    """MAE's per-sample uniform random mask: keeps exactly ``int(L * (1 - ratio))`` units.

    Matches ``random_masking`` in facebookresearch/mae (``len_keep = int(L * (1 - mask_ratio))``).
    """

    def _hidden_count(self) -> int:
        return self.num_units - int(self.num_units * (1.0 - self.ratio))

    def sample_units(self, rng: np.random.Generator) -> np.ndarray:
        flat = np.zeros(self.num_units, dtype=bool)
        flat[rng.permutation(self.num_units)[: self.num_hidden_units]] = True
        return flat.reshape(self.unit_grid)

    def draw(self, batch: int, device: torch.device | str | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """On the device: :func:`random_mask` on the unit grid, expanded to the model-patch grid."""
        count = 1 if self.per_batch else batch
        return self.expand_units(random_mask(count, self.unit_grid, self.ratio, device=device, generator=generator))


class SimMIMMask(RandomMask):
    """SimMIM's ``MaskGenerator``: hides ``ceil(L * ratio)`` random mask units (default 32px units).

    The count rule differs from MAE's by rounding (``ceil`` of the hidden count instead of ``floor``
    of the kept count), as in microsoft/SimMIM ``data/data_simmim.py``.
    """

    def _hidden_count(self) -> int:
        return int(math.ceil(self.num_units * self.ratio))

    def draw(self, batch: int, device: torch.device | str | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """On the device: per mask the ``num_hidden_units`` units of smallest uniform noise, expanded."""
        count = 1 if self.per_batch else batch
        noise = torch.rand(count, self.num_units, device=device, generator=generator)
        hidden = noise.argsort(dim=1).argsort(dim=1) < self.num_hidden_units
        return self.expand_units(hidden.reshape(count, *self.unit_grid))


class BlockMask(MaskGenerator):
    """BEiT's block-wise mask: rectangles of random area and aspect until ``round(L * ratio)`` are hidden.

    Follows BEiT's ``MaskingGenerator`` (blocks of ``min_block``..``max_block`` units with aspect in
    ``[min_aspect, 1/min_aspect]``, up to 10 tries per block). BEiT may stop a few units short when it
    cannot place another block; here the remainder is hidden uniformly at random so every sample has
    the same count, which methods that drop hidden tokens (MAE, iTPN) need to batch.
    """

    def __init__(self, input_size: int | Sequence[int], patch_size: int, ratio: float, unit: int | None = None,
                 min_block: int = 16, max_block: int | None = None, min_aspect: float = 0.3, per_batch: bool = False) -> None:
        super().__init__(input_size, patch_size, ratio, unit, per_batch)
        if min_aspect <= 0:
            raise ConfigError("mask.min_aspect", min_aspect, "a positive number such as 0.3")
        self.min_block = max(1, min(int(min_block), self.num_hidden_units))
        self.max_block = self.num_hidden_units if max_block is None else max(self.min_block, int(max_block))
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def _hidden_count(self) -> int:
        return int(round(self.num_units * self.ratio))

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        height, width = mask.shape
        for _ in range(10):
            area = rng.uniform(self.min_block, max(self.min_block, budget))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < height and 0 < w < width:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                window = mask[top: top + h, left: left + w]
                added = h * w - int(window.sum())
                if 0 < added <= budget:
                    window[...] = True
                    return added
        return 0

    def sample_units(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.unit_grid, dtype=bool)
        count = 0
        while count < self.num_hidden_units:
            added = self._place_block(mask, min(self.num_hidden_units - count, self.max_block), rng)
            if added == 0:
                break
            count += added
        if count < self.num_hidden_units:
            free = np.flatnonzero(~mask.reshape(-1))
            chosen = rng.choice(free, size=self.num_hidden_units - count, replace=False)
            mask.reshape(-1)[chosen] = True
        return mask


def random_mask(batch_size: int, grid: tuple[int, int], ratio: float, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """On-device MAE masking: per sample, hide all but ``int(L * (1 - ratio))`` random patches.

    The same rule as ``mae:models_mae.py random_masking`` (uniform noise, argsort), returned as the
    bool grid ``(B, gh, gw)``, True = hidden, as every generator here returns it.
    """
    length = grid[0] * grid[1]
    keep = int(length * (1.0 - ratio))
    noise = torch.rand(batch_size, length, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank >= keep).reshape(batch_size, *grid)


# --------------------------------------------------------------------------------------------- MixMAE
def check_ratio_range(ratio: float, ratio_range: float, key: str = "mask.ratio_range") -> float:
    """``ratio_range`` >= 0 with ``ratio + ratio_range`` < 1 (MixMIM's ``range_mask_ratio``)."""
    if not isinstance(ratio_range, (int, float)) or ratio_range < 0 or ratio + ratio_range >= 1.0:
        raise ConfigError(key, ratio_range, f"a number >= 0 with mask.ratio + range < 1 (mask.ratio is {ratio})")
    return float(ratio_range)


class MixMask(MaskGenerator):
    """MixMAE's mixing mask (Sense-X/MixMIM ``random_masking``): ``int(L * r)`` random units set,
    with ``r = ratio + U(0, ratio_range)`` drawn per mask (``ratio_range`` 0 by default).

    True = the unit comes from the partner image. MixMAE draws it on the encoder's *output* grid
    (``patch_size`` = the encoder stride, 32 for Swin; 7x7 at 224px) and shares one mask across the
    batch, hence ``per_batch=True`` by default. The count rule hides ``int(L * r)`` units (24 of 49 at
    0.5), one fewer than :class:`RandomMask`'s ``L - int(L * (1 - r))``.
    """

    def __init__(self, input_size: int | Sequence[int], patch_size: int, ratio: float = 0.5, unit: int | None = None,
                 ratio_range: float = 0.0, per_batch: bool = True) -> None:
        self.ratio_range = check_ratio_range(check_ratio(ratio), ratio_range)
        check_divisible(input_size, int(patch_size), "data.image_size", "mask.patch_size (MixMAE: the encoder stride)")
        super().__init__(input_size, patch_size, ratio, unit, per_batch)
        most = int(self.num_units * (self.ratio + self.ratio_range))
        if most >= self.num_units:
            raise ConfigError("mask.ratio_range", self.ratio_range, f"a range that hides fewer than all "
                              f"{self.num_units} units (mask.ratio is {self.ratio})")

    def _hidden_count(self) -> int:
        return int(self.num_units * self.ratio)

    def sample_units(self, rng: np.random.Generator) -> np.ndarray:
        ratio = self.ratio + (rng.uniform(0.0, self.ratio_range) if self.ratio_range > 0 else 0.0)
        flat = np.zeros(self.num_units, dtype=bool)
        flat[rng.permutation(self.num_units)[: int(self.num_units * ratio)]] = True
        return flat.reshape(self.unit_grid)

    @property
    def fixed_hidden(self) -> int | None:
        return None if self.ratio_range > 0 else self.num_hidden

    def draw(self, batch: int, device: torch.device | str | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """On the device: :func:`mix_mask` (no read-back even with a ``ratio_range``), expanded."""
        count = 1 if self.per_batch else batch
        masks = [mix_mask(self.unit_grid, self.ratio, self.ratio_range, device=device, generator=generator)
                 for _ in range(count)]
        return self.expand_units(masks[0] if count == 1 else torch.cat(masks))


def mix_mask(grid: tuple[int, int], ratio: float, ratio_range: float = 0.0, device: torch.device | str | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """On-device MixMIM ``random_masking``: one (1, gh, gw) bool mask for the whole batch with
    ``int(L * r)`` units set, ``r = ratio + U(0, ratio_range)``; the set units are those with the
    smallest uniform noise, as the official ``argsort(noise)[:count]``.

    With a ``ratio_range`` the count is computed on the device (float64, as Python's ``int(L * r)``) and
    never read back, so drawing a mask does not wait for the GPU.
    """
    length = grid[0] * grid[1]
    noise = torch.rand(1, length, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    if ratio_range > 0:
        dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
        offset = torch.rand((), device=device, generator=generator, dtype=dtype) * ratio_range
        count = torch.floor(length * (ratio + offset))
        return (rank < count).reshape(1, *grid)
    return (rank < int(length * ratio)).reshape(1, *grid)


def model_mask_generator(given: MaskGenerator | None, default: Callable[[], MaskGenerator],
                         input_size: int | Sequence[int], patch_size: int, grid_name: str) -> MaskGenerator:
    """A model's mask generator: ``given`` (the run's, shared with the data transform) or ``default()`` (the
    model's own rule, for a model built by hand), checked against the model's grid (:func:`check_model_grid`)."""
    generator = default() if given is None else given
    check_model_grid(generator, input_size, patch_size, grid_name)
    return generator


def check_model_grid(generator: MaskGenerator, input_size: int | Sequence[int], patch_size: int, grid_name: str) -> None:
    """A generator handed to a model must draw on the grid the model takes masks on: ``input_size`` images
    in ``patch_size`` cells (``grid_name`` says which cells, for the message)."""
    size = to_pair(input_size)
    if generator.input_size != size:
        shown = size[0] if size[0] == size[1] else size
        raise ConfigError("mask.input_size", generator.input_size[0] if generator.input_size[0] == generator.input_size[1]
                          else generator.input_size, f"{shown}, the model's image size (data.image_size)")
    if generator.patch_size != int(patch_size):
        raise ConfigError("mask.patch_size", generator.patch_size, f"{patch_size}, {grid_name}",
                          f"the model takes masks on its {patch_size}px grid")
