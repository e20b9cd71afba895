"""Reconstruction grids: original | masked input | prediction | prediction pasted into visible pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


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
    count = images.shape[0]
    order = [i for k in range((count + 1) // 2) for i in dict.fromkeys((k, count - 1 - k))]
    return panels[order]


def panels_to_grid(panels: torch.Tensor, pad: int = 2) -> np.ndarray:
    """(B, P, 3, H, W) in [0, 1] -> one uint8 (rows*(H+pad), P*(W+pad), 3) image, a row per sample."""
    b, p, c, h, w = panels.shape
    grid = torch.ones(b, p, c, h + pad, w + pad)
    grid[..., :h, :w] = panels
    grid = grid.permute(0, 3, 1, 4, 2).reshape(b * (h + pad), p * (w + pad), c)
    return (grid.numpy() * 255.0 + 0.5).astype(np.uint8)
