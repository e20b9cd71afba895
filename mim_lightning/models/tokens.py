"""Token dropping shared by the methods whose encoder sees the visible units only (MAE, iTPN-pixel).

A bool mask ``(B, L)`` (True = hidden) with the same number of hidden units in every row becomes the
``ids_shuffle`` / ``ids_restore`` permutations of MAE's ``random_masking``: visible units first (raster
order), then the hidden ones. The number kept is a tensor shape, so it is read on the host; the helpers
here read it without waiting for the device whenever that is possible.
"""

from __future__ import annotations

import torch

from mim_lightning.errors import ConfigError
from mim_lightning.masking import MaskGenerator


def kept_count(mask: torch.Tensor) -> int:
    """Visible patches per sample of a (B, L) bool mask; :class:`ConfigError` unless every row hides the
    same number (the encoder drops hidden patches, so rows must stay the same length).

    The count becomes a tensor shape, so it has to be read on the host: free for a mask on the CPU (the
    pretraining module hands masks over on the host for that reason), one device sync for a GPU mask.
    """
    hidden = mask.sum(dim=1)
    low, high = (int(v) for v in torch.stack(hidden.aminmax()).tolist())
    if low != high:
        raise ConfigError("mask", f"{low}..{high} hidden patches per sample",
                          "the same number of hidden patches in every sample of a batch (MAE drops them)")
    return mask.shape[1] - low


def visible_first_order(mask: torch.Tensor, len_keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For a (B, L) bool mask with the same number of hidden patches per row, return
    ``(ids_shuffle, ids_restore, len_keep)``: visible indices first (raster order), then hidden.
    ``len_keep`` (from :func:`kept_count`) is computed from the mask when not given."""
    if len_keep is None:
        len_keep = kept_count(mask)
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore, len_keep


def device_unit_mask(mask: torch.Tensor | None, batch: int, grid: tuple[int, int], generator: MaskGenerator,
                     device: torch.device) -> tuple[torch.Tensor, int]:
    """The (B, L) bool mask on ``device`` and its kept count, with no device sync: a given mask (any device,
    (B, ...) or one (1, ...) mask for the batch) is counted where it lives (see :func:`kept_count`) and
    then copied without blocking; ``None`` draws ``generator.draw`` on the device, whose count is known
    (``generator.fixed_hidden``; a rule whose count varies is counted on the device, one sync)."""
    length = grid[0] * grid[1]
    if mask is None:
        drawn = generator.draw(batch, device=device)
        if drawn.shape[0] == 1 and batch > 1:
            drawn = drawn.expand(batch, *drawn.shape[1:])
        flat = drawn.reshape(batch, length)
        hidden = generator.fixed_hidden
        return flat, kept_count(flat) if hidden is None else length - hidden
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, *mask.shape[1:])  # one mask shared by the batch
    flat = mask.reshape(batch, -1).bool()
    len_keep = kept_count(flat)
    return flat.to(device, non_blocking=True), len_keep
