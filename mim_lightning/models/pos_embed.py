"""Fixed 2-D sin-cos position embeddings, laid out as in facebookresearch/mae ``util/pos_embed.py``."""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim): ``[sin(pos * omega), cos(pos * omega)]``, omega = 1/10000^(2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).double()[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(embed_dim: int, grid: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """(gh*gw [+1], embed_dim) fp32 table for a row-major grid of gh rows and gw columns.

    The first half of the channels encodes the **column** coordinate and the second half the row,
    the official MAE layout (``np.meshgrid(grid_w, grid_h)``, "w goes first"); mmpretrain swaps the
    halves, so tables from the two are not interchangeable. With ``cls_token`` a zero row is prepended.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
