"""Weight surgery for another image size or window: absolute position embeddings (bicubic), relative position bias
tables (SimMIM's geometric resampling, or bicubic as MixMIM), and SimMIM-ViT's shared table copied to every block."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mim_lightning.errors import ConfigError


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1,
                     old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Bicubic resize of a (1, P + h*w, D) absolute position embedding to ``new_grid``; the ``P`` prefix
    (cls) rows are copied unchanged, as ``mae:util/pos_embed.py interpolate_pos_embed`` (``align_corners=False``,
    no antialiasing). ``old_grid`` defaults to the square root of the token count."""
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    count, dim = grid_tokens.shape[1], grid_tokens.shape[2]
    if old_grid is None:
        side = int(math.isqrt(count))
        if side * side != count:
            raise ConfigError("pretrained", tuple(pos_embed.shape), "a pos_embed of a square grid (plus prefix tokens)")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = grid_tokens.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _geometric_offsets(src_size: int, dst_size: int) -> "np.ndarray":
    """SimMIM/BEiT's source coordinates: offsets growing geometrically from the centre so that the
    ``src_size`` table spans the ``dst_size`` one (the ratio found by bisection, as ``SimMIM:utils.py``)."""
    import numpy as np

    half_src, half_dst = src_size // 2, dst_size // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        total = (1.0 - q ** half_src) / (1.0 - q)
        if total > half_dst:
            right = q
        else:
            left = q
    distances, current = [], 1.0
    for i in range(half_src):
        distances.append(current)
        current += q ** (i + 1)
    return np.array([-d for d in reversed(distances)] + [0.0] + distances)


def _window_pair(window: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(window, (tuple, list)):
        return int(window[0]), int(window[1])
    return int(window), int(window)


def resize_rel_pos_bias(table: torch.Tensor, new_window: int | tuple[int, int],
                        old_window: int | tuple[int, int] | None = None, mode: str = "geometric",
                        num_extra_tokens: int = 0) -> torch.Tensor:
    """Resize a relative-position-bias table ((2h-1)(2w-1) + extra, heads) to window ``new_window``.

    Swin tables have no extra rows; BEiT-style ViT tables (SimMIM ViT) end with ``num_extra_tokens=3`` rows
    (cls-to-token, token-to-cls, cls-to-cls), which are kept unchanged, as ``SimMIM:utils.py
    remap_pretrained_keys_vit``. ``old_window`` defaults to the square window the row count gives.

    ``mode='geometric'``: SimMIM's ``load_pretrained`` resampling (cubic interpolation over source points
    spaced in a geometric progression from the centre; the official ``scipy.interpolate.interp2d(kind='cubic')``
    was removed from SciPy 1.14, so an interpolating bicubic ``RectBivariateSpline`` on the same points is used,
    needs scipy). ``mode='bicubic'``: ``F.interpolate`` on the uniform grid (torch only). Both keep the centre
    value (relative offset 0) exactly for odd-to-odd sizes (6 -> 7 is 11x11 -> 13x13). Windows may be
    rectangular (``(h, w)``; each axis is resampled on its own); the official code handles square ones only.
    """
    import numpy as np

    rows, heads = table.shape
    extra = int(num_extra_tokens)
    body_rows = rows - extra
    new_h, new_w = _window_pair(new_window)
    dst = (2 * new_h - 1, 2 * new_w - 1)
    if old_window is not None:
        old_h, old_w = _window_pair(old_window)
        src = (2 * old_h - 1, 2 * old_w - 1)
        if src[0] * src[1] != body_rows:
            raise ConfigError("pretrained", tuple(table.shape), f"a table for window {old_window}"
                              + (f" plus {extra} extra rows" if extra else ""))
    else:
        side = int(math.isqrt(max(body_rows, 0)))
        if side * side == body_rows:
            src = (side, side)
        elif body_rows == dst[0] * dst[1]:
            src = dst
        else:
            raise ConfigError("pretrained", tuple(table.shape), "a relative_position_bias_table of (2w-1)^2 rows"
                              + (f" plus {extra} extra rows" if extra else ""))
    if src == dst:
        return table
    body, tail = table[:body_rows], table[body_rows:]
    grid = body.detach().float().reshape(src[0], src[1], heads)
    if mode == "bicubic":
        out = F.interpolate(grid.permute(2, 0, 1).unsqueeze(0), size=dst, mode="bicubic", align_corners=False)
        out = out[0].permute(1, 2, 0).reshape(dst[0] * dst[1], heads)
    elif mode == "geometric":
        try:
            from scipy.interpolate import RectBivariateSpline
        except ImportError:  # pragma: no cover - scipy ships with most installs
            raise ConfigError("rel_pos_resize", mode, "bicubic (scipy is not installed)") from None
        def offsets(src_size: int, dst_size: int) -> "np.ndarray":  # an axis of the same size stays on its points
            if src_size == dst_size:
                return np.arange(-(src_size // 2), src_size // 2 + 0.1, 1.0)
            return _geometric_offsets(src_size, dst_size)

        rows_at, cols_at = offsets(src[0], dst[0]), offsets(src[1], dst[1])
        rows_to = np.arange(-(dst[0] // 2), dst[0] // 2 + 0.1, 1.0)
        cols_to = np.arange(-(dst[1] // 2), dst[1] // 2 + 0.1, 1.0)
        # cubic; a lower order only for tables too small for it (window 2)
        kx, ky = min(3, src[0] - 1), min(3, src[1] - 1)
        columns = []
        for head in range(heads):
            spline = RectBivariateSpline(rows_at, cols_at, grid[:, :, head].numpy().astype(np.float64), kx=kx, ky=ky,
                                         s=0)
            columns.append(torch.from_numpy(spline(rows_to, cols_to)).reshape(-1))
        out = torch.stack(columns, dim=1)
    else:
        raise ConfigError("rel_pos_resize", mode, "geometric, bicubic")
    return torch.cat([out.to(table.dtype), tail], dim=0)


def expand_shared_rel_pos_bias(state: Mapping[str, torch.Tensor], depth: int,
                               shared_key: str = "rel_pos_bias.relative_position_bias_table"
                               ) -> dict[str, torch.Tensor]:
    """SimMIM-ViT / BEiT finetuning: copy the pretraining's shared relative position bias table to every block
    (``blocks.{i}.attn.relative_position_bias_table``) and drop the shared one, as ``SimMIM:utils.py
    remap_pretrained_keys_vit``. A state without the shared table (per-block tables already, e.g. a finetuned
    model) is returned unchanged; the official code raises a KeyError there (SimMIM#19)."""
    out = dict(state)
    shared = out.pop(shared_key, None)
    if shared is None:
        return out
    for index in range(int(depth)):
        out.setdefault(f"blocks.{index}.attn.relative_position_bias_table", shared.clone())
    return out
