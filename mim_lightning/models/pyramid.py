"""iTPN's in-unit feature pyramid (shared by iTPN-pixel and iTPN-CLIP): the top-down levels built inside each
HiViT unit from the main stage and the two stems, their decoder embedding, and the official key prefixes of the
pyramid and the HiViT encoder in iTPN checkpoints (``sunsmarterjie/iTPN``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.models.backbones.hivit import HiViTBlock, init_trunc_normal

#: Official key prefixes in iTPN checkpoints: the HiViT encoder's and the pyramid's.
ITPN_ENCODER_PREFIXES = ("patch_embed.", "absolute_pos_embed", "blocks.")
ITPN_PYRAMID_PREFIXES = ("align_dim_", "split_", "block_16to8.", "block_8to4.", "fpn_modules.")


class PatchSplit(nn.Module):
    """In-unit 2x up-sampling: (B, N, h, w, dim) -> (B, N, 2h, 2w, out_dim) via LN(dim) and
    Linear(dim -> 4 * out_dim, no bias), each token becoming its 2x2 children (row-major)."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.reduction = nn.Linear(dim, 4 * out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h, w, _ = x.shape
        x = self.reduction(self.norm(x)).reshape(b, n, h, w, 2, 2, self.out_dim)
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, n, 2 * h, 2 * w, self.out_dim)


class FeaturePyramid(nn.Module):
    """iTPN's in-unit feature pyramid (``num_outs=3``), top-down from the main stage.

    ``forward(x, features)``: x (B, K, C) main-stage tokens; features = [f4 (B, K, 4, 4, C/4),
    f8 (B, K, 2, 2, C/2)] from the stems. Returns three levels, coarse to fine:
    (B, K, 1, 1, fpn_dim), (B, K, 2, 2, fpn_dim), (B, K, 4, 4, fpn_dim). Every block is MLP-only
    (``mlp_ratio`` 4, no drop path), so the pyramid, like the stems, never mixes units.
    """

    def __init__(self, embed_dim: int, fpn_dim: int = 256, fpn_depth: int = 2, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if isinstance(fpn_dim, bool) or not isinstance(fpn_dim, int) or fpn_dim <= 0:
            raise ConfigError("method.model.fpn_dim", fpn_dim, "a positive integer, e.g. 256")
        if isinstance(fpn_depth, bool) or not isinstance(fpn_depth, int) or fpn_depth < 0:
            raise ConfigError("method.model.fpn_depth", fpn_depth, "a non-negative integer (pixel 2, CLIP 1)")
        self.fpn_dim = fpn_dim

        def blocks(count: int) -> list[HiViTBlock]:
            return [HiViTBlock(fpn_dim, 0, mlp_ratio, norm_eps=norm_eps) for _ in range(count)]

        self.align_dim_16tofpn = nn.Linear(embed_dim, fpn_dim) if embed_dim != fpn_dim else None
        self.split_16to8 = PatchSplit(embed_dim, fpn_dim, norm_eps)
        self.align_dim_16to8 = nn.Linear(embed_dim // 2, fpn_dim, bias=False)
        self.block_16to8 = nn.Sequential(*blocks(fpn_depth))
        self.split_8to4 = PatchSplit(fpn_dim, fpn_dim, norm_eps)
        self.align_dim_8to4 = nn.Linear(embed_dim // 4, fpn_dim, bias=False)
        self.block_8to4 = nn.Sequential(*blocks(fpn_depth))
        self.fpn_modules = nn.ModuleList(blocks(3))
        self.apply(init_trunc_normal)

    def forward(self, x: torch.Tensor, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = x[:, :, None, None, :]
        outs = [x if self.align_dim_16tofpn is None else self.align_dim_16tofpn(x)]
        x = self.block_16to8(self.split_16to8(x) + self.align_dim_16to8(features[1]))
        outs.append(x)
        x = self.block_8to4(self.split_8to4(x) + self.align_dim_8to4(features[0]))
        outs.append(x)
        return [module(out) for module, out in zip(self.fpn_modules, outs)]


def pyramid_embed(dim: int, fpn_dim: int, norm_eps: float = 1e-6) -> nn.ModuleList:
    """``decoder_embed``: per level LN(fpn_dim) + Linear(fpn_dim -> dim / 4**level), so that each level,
    flattened over its 1, 4 or 16 sub-tokens, is ``dim`` wide per unit."""
    return nn.ModuleList(
        nn.Sequential(nn.LayerNorm(fpn_dim, eps=norm_eps), nn.Linear(fpn_dim, dim // 4**level)) for level in range(3)
    )


def check_pyramid_width(dim: int, key: str) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 16:
        raise ConfigError(key, dim, "a positive multiple of 16 (the 4x4 level is embedded at width/16 per sub-token)")


def flat_unit_mask(mask: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Check a (B, gh, gw) or (B, gh*gw) mask against the unit grid and return it as (B, L) bool."""
    length = grid[0] * grid[1]
    if mask.shape[0] != batch or mask[0].numel() != length or (mask.ndim == 3 and tuple(mask.shape[1:]) != grid):
        raise ConfigError("mask", tuple(mask.shape), f"a bool mask of shape ({batch}, {grid[0]}, {grid[1]}) on the "
                          f"{grid[0]}x{grid[1]} unit grid (mask.unit = backbone.patch_size)")
    return mask.reshape(batch, length).bool()
