"""Reconstruction grids: original | masked input | prediction | prediction pasted into visible pixels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

#: Column titles of :func:`reconstruction_panels` and :func:`mixing_panels`.
RECONSTRUCTION_TITLES = ("original", "masked", "prediction", "prediction + visible")
MIXING_TITLES = ("original", "mixed input", "un-mixed reconstruction")


def mask_to_pixels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) bool mask -> (B, 1, H, W) bool, each cell covering its H/gh x W/gw pixels."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest").bool()


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalized (B, 3, H, W) -> [0, 1] pixel values (clamped)."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0.0, 1.0)


def reconstruction_panels(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, mean: Sequence[float],
                          std: Sequence[float], fill: float = 0.5) -> torch.Tensor:
    """(B, 4, 3, H, W) in [0, 1]: original, masked (hidden pixels grey), prediction, and the
    prediction pasted into the hidden pixels of the original (visible pixels are the input's)."""
    images, pred = images.float().cpu(), pred.float().cpu()
    hidden = mask_to_pixels(mask.cpu(), images.shape[-2:])
    original = denormalize(images, mean, std)
    prediction = denormalize(pred, mean, std)
    masked = torch.where(hidden, torch.full_like(original, fill), original)
    pasted = torch.where(hidden, prediction, original)
    return torch.stack([original, masked, prediction, pasted], dim=1)


def mixing_panels(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, mean: Sequence[float],
                  std: Sequence[float]) -> torch.Tensor:
    """MixMAE view, (B, 3, 3, H, W) in [0, 1]: original, the mixed image the encoder saw (sample i takes
    sample B-1-i where the batch mask is set) and the un-mixed reconstruction. Rows come in pairs
    (0, B-1, 1, B-2, ...), so both mixes of a pair and both reconstructions sit next to each other."""
    images, pred = images.float().cpu(), pred.float().cpu()
    taken = mask_to_pixels(mask.cpu(), images.shape[-2:])
    original = denormalize(images, mean, std)
    mixed = torch.where(taken, original.flip(0), original)
    panels = torch.stack([original, mixed, denormalize(pred, mean, std)], dim=1)
    return panels[pair_order(images.shape[0])]


def pair_order(count: int) -> list[int]:
    """The row order of :func:`mixing_panels`: 0, count-1, 1, count-2, ... (each index once)."""
    return [i for k in range((count + 1) // 2) for i in dict.fromkeys((k, count - 1 - k))]


def panels_to_grid(panels: torch.Tensor, pad: int = 2) -> np.ndarray:
    """(B, P, 3, H, W) in [0, 1] -> one uint8 (rows*(H+pad), P*(W+pad), 3) image, a row per sample."""
    b, p, c, h, w = panels.shape
    grid = torch.ones(b, p, c, h + pad, w + pad)
    grid[..., :h, :w] = panels
    grid = grid.permute(0, 3, 1, 4, 2).reshape(b * (h + pad), p * (w + pad), c)
    return (grid.numpy() * 255.0 + 0.5).astype(np.uint8)


def upscale(panels: torch.Tensor, min_size: int) -> torch.Tensor:
    """Repeat pixels (nearest neighbour, an integer factor) until the shorter side is >= ``min_size``;
    images already that large are returned unchanged."""
    factor = max(1, math.ceil(min_size / min(panels.shape[-2:])))
    if factor == 1:
        return panels
    return panels.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def title_band(titles: Sequence[str], column_width: int, pad: int = 2) -> np.ndarray:
    """A white uint8 (h, len(titles) * (column_width + pad), 3) band with each title centred (and wrapped)
    above its column, in PIL's default font."""
    try:
        font = ImageFont.load_default(size=max(11, min(18, column_width // 12)))
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    wrapped = [_wrap(title, font, column_width - 4) for title in titles]
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (10, 2)
    line = ascent + descent + 1
    band = Image.new("RGB", (len(titles) * (column_width + pad), 6 + line * max(map(len, wrapped))), "white")
    draw = ImageDraw.Draw(band)
    for column, lines in enumerate(wrapped):
        for row, text in enumerate(lines):
            left = column * (column_width + pad) + (column_width - font.getlength(text)) / 2
            draw.text((max(0.0, left), 3 + row * line), text, fill="black", font=font)
    return np.asarray(band)


def titled_grid(panels: torch.Tensor, titles: Sequence[str], min_tile: int = 128, pad: int = 2) -> np.ndarray:
    """(B, P, 3, H, W) in [0, 1] -> a uint8 image: a band with the P column ``titles`` above the
    :func:`panels_to_grid` of the panels, upscaled (nearest neighbour) so each tile is >= ``min_tile`` px."""
    if len(titles) != panels.shape[1]:
        raise ValueError(f"{len(titles)} titles for {panels.shape[1]} panels per row")
    panels = upscale(panels, min_tile)
    return np.concatenate([title_band(titles, panels.shape[-1], pad), panels_to_grid(panels, pad)])
