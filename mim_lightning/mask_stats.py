"""Statistics of mask configurations: the configured and the actually applied hidden ratio, and
SimMIM's AvgDist.

The two ratios differ when the unit grid is small: SimMIM hides ``ceil(0.6 * units)`` 32px units,
3 of the 4 units of a 64px image (0.75), and MAE keeps ``int(L * 0.25)`` patches.

AvgDist (Xie et al., SimMIM, 2022, §4.2) is the mean Euclidean distance, in pixels, from each hidden
pixel to the nearest visible pixel. It summarises how hard a mask configuration (ratio and unit size)
makes the task: the paper finds fine-tuning accuracy peaks for AvgDist around 10-20.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mim_lightning.masking import MaskGenerator


def pixel_mask(mask: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
    """(gh, gw) bool grid -> (gh*ch, gw*cw) bool pixels, each cell covering ``cell`` pixels."""
    return np.asarray(mask, dtype=bool).repeat(cell[0], axis=0).repeat(cell[1], axis=1)


def avg_dist(mask: np.ndarray, cell: tuple[int, int] = (1, 1)) -> float:
    """Mean distance (pixels) from hidden pixels to the nearest visible pixel of a (gh, gw) mask.

    Returns 0 when nothing is hidden and ``inf`` when nothing is visible.
    """
    pixels = pixel_mask(mask, cell)
    if not pixels.any():
        return 0.0
    if pixels.all():
        return float("inf")
    distances = ndimage.distance_transform_edt(pixels)  # distance of each True pixel to the nearest False
    return float(distances[pixels].mean())


def mask_statistics(generator: MaskGenerator, samples: int = 64, seed: int = 0) -> dict[str, float]:
    """Over ``samples`` masks: ``mask/config_ratio`` (the generator's ``ratio``, i.e. ``mask.ratio``),
    ``mask/applied_ratio`` (mean hidden fraction of the patches) and ``mask/avg_dist`` (pixels)."""
    rng = np.random.default_rng(seed)
    image_h, image_w = generator.input_size
    ratios, dists = [], []
    for _ in range(samples):
        mask = generator(rng)
        cell = (image_h // mask.shape[0], image_w // mask.shape[1])
        ratios.append(float(mask.mean()))
        dists.append(avg_dist(mask, cell))
    return {"mask/config_ratio": float(generator.ratio), "mask/applied_ratio": float(np.mean(ratios)),
            "mask/avg_dist": float(np.mean(dists))}
