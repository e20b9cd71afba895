"""Pure loss and patch functions shared by the methods (no module state, shapes in docstrings)."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), each patch vector ordered (row p, col q, channel) as MAE's
    ``einsum('nchpwq->nhwpqc')``; L = (H/p) * (W/p) in row-major order."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, gh*p, gw*p)."""
    b = patches.shape[0]
    p = patch_size
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's norm-pix target: per patch, over all p*p*C values together.

    Returns ``(normalized, mean, var)`` with ``normalized = (x - mean) / sqrt(var + eps)`` and the
    *unbiased* variance, as ``mae:models_mae.py forward_loss``. Computed in fp32.
    """
    patches = patches.float()
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt(), mean, var


def denormalize_patches(normalized: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Map norm-pix predictions back to pixels with the target patch statistics (for display)."""
    return normalized * (var + eps).sqrt() + mean


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, L) over positions where ``mask`` (B, L) is True: sum(v*m) / sum(m)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE loss: per-patch mean squared error (B, L), averaged over hidden patches only.

    pred, target: (B, L, D); mask: (B, L) bool, True = hidden. Visible patches contribute nothing.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return masked_mean(per_patch, mask)


# --------------------------------------------------------------------------------------------- SimMIM
def masked_pixel_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """SimMIM loss: L1 over the hidden pixels, as microsoft/SimMIM ``models/simmim.py``.

    pred, target: (B, C, H, W) (normalized pixels, no per-patch normalization); mask: (B, gh, gw)
    bool/0-1, True = hidden, with H and W multiples of gh and gw (each cell covers H/gh x W/gw pixels).
    Returns ``sum(|pred - target| * m) / (sum(m) + eps) / C`` with ``m`` the (B, 1, H, W) pixel mask:
    the denominator counts hidden pixel *positions* (eps 1e-5 as official; mmpretrain has no eps), so
    the division by C makes it a mean over hidden pixel-channels. Computed in fp32.
    """
    height, width = target.shape[-2:]
    cell_h, cell_w = height // mask.shape[-2], width // mask.shape[-1]
    pixels = mask.float().repeat_interleave(cell_h, 1).repeat_interleave(cell_w, 2).unsqueeze(1)
    error = (pred.float() - target.float()).abs()
    return (error * pixels).sum() / (pixels.sum() + eps) / target.shape[1]
