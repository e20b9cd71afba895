"""Official checkpoints and weight surgery: key converters, pos-embed and rel-pos-bias resizing.

``convert_official(method, state_dict)`` maps an official *pretraining* checkpoint to the keys of this
project's pretraining model (``MaskedAutoencoder`` for MAE, ...); the result loads with
``model.load_state_dict(converted, strict=True)`` when the official file holds the whole model (MAE's
``*_full.pth``), and its ``encoder.*`` part loads into the finetuning classifiers in every case.
SimMIM files hold a Swin or a BEiT-style ViT encoder; the converter tells them apart by their keys.
Converters: ``mae``, ``simmim``, ``mixmae`` (= ``mixmim``), ``itpn`` (pixel) and ``itpn_clip``.
No network access: give it the state dict you downloaded yourself (``torch.load(path)["model"]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from mim_lightning.errors import ConfigError

# --------------------------------------------------------------------------- key converters

#: MAE decoder keys (``mae:models_mae.py``) that live under ``decoder.`` in the project's MaskedAutoencoder.
MAE_DECODER_PREFIXES = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                        "decoder_pred.")
MAE_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The tensor dict inside an official checkpoint file: ``ckpt['model']`` (MAE, SimMIM, MixMIM, iTPN),
    ``ckpt['state_dict']`` or the mapping itself; a ``module.`` (DDP) prefix is removed."""
    for key in ("model", "state_dict", "module"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _convert_mae(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``mae:models_mae.py`` keys -> ``MaskedAutoencoder`` keys: the encoder keys (timm names, identical in
    the project's :class:`~mim_lightning.models.backbones.vit.ViTEncoder`) go under ``encoder.``, the
    decoder's (``mask_token``, ``decoder_*``) under ``decoder.``. Released encoder-only files give only
    ``encoder.*`` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(MAE_DECODER_PREFIXES):
            out["decoder." + key] = value
        elif key.startswith(MAE_ENCODER_PREFIXES):
            out["encoder." + key] = value
        else:
            raise ConfigError("pretrained", key, "keys of an official MAE checkpoint (mae:models_mae.py)",
                              "unknown key for MAE")
    if "encoder.pos_embed" not in out or "encoder.blocks.0.attn.qkv.weight" not in out:
        raise ConfigError("pretrained", "MAE", "an official MAE checkpoint (cls_token, pos_embed, blocks.*)",
                          "the state dict has no ViT encoder keys; is it a checkpoint of another method?")
    return out


#: Buffers the official code saves and this project recomputes (non-persistent here).
DERIVED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


def _require(out: Mapping[str, torch.Tensor], key: str, method: str, layout: str) -> None:
    if key not in out:
        raise ConfigError("pretrained", method, f"an official {method} checkpoint ({layout})",
                          f"the state dict has no '{key}'; is it a checkpoint of another method?")


#: Key prefixes that tell the two official SimMIM encoder layouts apart (``SimMIM:models/simmim.py``).
SIMMIM_VIT_KEYS = ("encoder.cls_token", "encoder.blocks.", "encoder.rel_pos_bias.")
SIMMIM_SWIN_KEYS = ("encoder.layers.",)


def simmim_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``'vit'`` (``VisionTransformerForSimMIM``: cls token, blocks, shared relative position bias) or ``'swin'``
    (``SwinTransformerForSimMIM``: ``layers``) for an official SimMIM pretraining state dict, told by its keys."""
    vit = any(k.startswith(SIMMIM_VIT_KEYS) for k in state)
    swin = any(k.startswith(SIMMIM_SWIN_KEYS) for k in state)
    if vit == swin:
        raise ConfigError("pretrained", "SimMIM", "an official SimMIM checkpoint with a ViT (encoder.cls_token, "
                          "encoder.blocks.*) or a Swin (encoder.layers.*) encoder",
                          "found " + ("both layouts" if vit else "neither layout")
                          + "; is it a checkpoint of another method?")
    return "vit" if vit else "swin"


def _convert_simmim(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``SimMIM:models/simmim.py`` keys (``encoder.*`` and the 1x1-conv ``decoder.0.*``) are the project's
    already: the Swin encoder and the BEiT-style ViT encoder (``SimMIMViTEncoder``) use the official names. The
    layout is detected from the keys (:func:`simmim_layout`). The buffers ``relative_position_index``,
    ``relative_coords_table`` and ``attn_mask`` are dropped (recomputed here).

    The ViT layout must be the official pretraining configuration (``USE_SHARED_RPB=True``, ``USE_APE=False``,
    ``USE_RPB=False``, layer scale): a checkpoint with ``encoder.pos_embed`` or per-block relative position
    tables is a one-line error, since the project's SimMIM ViT has neither."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(DERIVED_BUFFERS):
            continue
        if not key.startswith(("encoder.", "decoder.")):
            raise ConfigError("pretrained", key, "keys of an official SimMIM checkpoint (encoder.*, decoder.0.*)",
                              "unknown key for SimMIM")
        out[key] = value
    _require(out, "decoder.0.weight", "SimMIM", "encoder.*, decoder.0.*")
    if simmim_layout(out) == "vit":
        unsupported = [k for k in out if k == "encoder.pos_embed" or k.endswith(".attn.relative_position_bias_table")]
        if unsupported:
            raise ConfigError("pretrained", unsupported[0], "an official SimMIM ViT pretrained with the shared "
                              "relative position bias and no absolute position embedding (USE_SHARED_RPB=True, "
                              "USE_APE=False, USE_RPB=False: configs/vit_base__800ep)",
                              "the project's SimMIM ViT has no such weights")
        layout = "ViT encoder.cls_token, encoder.rel_pos_bias.*, encoder.blocks.*"
        for key in ("encoder.cls_token", "encoder.rel_pos_bias.relative_position_bias_table",
                    "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.gamma_1"):
            _require(out, key, "SimMIM", layout)
    else:
        _require(out, "encoder.patch_embed.proj.weight", "SimMIM", "Swin encoder.patch_embed.*, encoder.layers.*")
    return out


MIXMIM_ENCODER_PREFIXES = ("patch_embed.", "absolute_pos_embed", "layers.", "norm.")
MIXMIM_DECODER_PREFIXES = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                           "decoder_pred.")


def _route_keys(state: Mapping[str, torch.Tensor], routes: tuple[tuple[str, tuple[str, ...]], ...],
                drop: tuple[str, ...], method: str, source: str) -> dict[str, torch.Tensor]:
    """Prefix each official key with the project module it belongs to: ``routes`` pairs a prefix to add
    with the official key prefixes it takes, first match wins; keys ending in ``drop`` are skipped and
    any other key is a one-line error naming it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(drop):
            continue
        target = next((prefix for prefix, starts in routes if key.startswith(starts)), None)
        if target is None:
            raise ConfigError("pretrained", key, f"keys of an official {method} checkpoint ({source})",
                              f"unknown key for {method}")
        out[target + key] = value
    return out


def _convert_mixmim(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``MixMIM:models_mixmim.py`` keys -> ``MixMAE`` keys: the encoder's (``patch_embed``, ``absolute_pos_embed``,
    ``layers``, ``norm``) under ``encoder.``, ``mask_token`` and ``decoder_*`` under ``decoder.``. The Swin
    ``relative_position_index`` buffers are kept (the project's MixMIM encoder stores them too); ``attn_mask`` is dropped."""
    out = _route_keys(state, (("decoder.", MIXMIM_DECODER_PREFIXES), ("encoder.", MIXMIM_ENCODER_PREFIXES)),
                      drop=("attn_mask",), method="MixMIM", source="models_mixmim.py")
    _require(out, "encoder.absolute_pos_embed", "MixMIM", "patch_embed, absolute_pos_embed, layers.*")
    return out


ITPN_ENCODER_PREFIXES = ("patch_embed.", "absolute_pos_embed", "blocks.")
ITPN_PYRAMID_PREFIXES = ("align_dim_", "split_", "block_16to8.", "block_8to4.", "fpn_modules.")
ITPN_DECODER_PREFIXES = ("mask_token", "decoder_")


def _convert_itpn(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``iTPN:itpn_pixel/models/models_itpn_mim.py`` keys -> ``ITPNPixel`` keys: HiViT (``patch_embed``,
    ``absolute_pos_embed``, ``blocks``) under ``encoder.``; ``align_dim_*``, ``split_*``, ``block_16to8``,
    ``block_8to4``, ``fpn_modules`` under ``pyramid.``; ``decoder_*`` and ``mask_token`` under ``decoder.``;
    ``relative_position_index`` buffers dropped."""
    out = _route_keys(state, (("encoder.", ITPN_ENCODER_PREFIXES), ("pyramid.", ITPN_PYRAMID_PREFIXES),
                              ("decoder.", ITPN_DECODER_PREFIXES)),
                      drop=DERIVED_BUFFERS, method="iTPN", source="iTPN-pixel models_itpn_mim.py")
    _require(out, "encoder.absolute_pos_embed", "iTPN", "patch_embed, absolute_pos_embed, blocks.*")
    return out


#: iTPN-CLIP's heads (``iTPN:itpn_clip/modeling_pretrain.py iTPNClipDistill``), top-level in ``ITPNClip`` too.
ITPN_CLIP_HEAD_PREFIXES = ("mask_token", "decoder_embed.", "norm.", "norm_cls.", "lm_head.", "lm_cls_head.",
                           "cls_pt_layers.")


def _convert_itpn_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``iTPNClipDistill`` keys -> ``ITPNClip`` keys: HiViT (``patch_embed``, ``absolute_pos_embed``, ``blocks``,
    with ``gamma_*`` and relative position tables) under ``encoder.``; the pyramid (as iTPN-pixel) under
    ``pyramid.``; ``mask_token``, ``decoder_embed``, ``norm``, ``lm_head`` and the auxiliary ``cls_pt_layers``,
    ``norm_cls``, ``lm_cls_head`` keep their names. ``relative_position_index`` buffers are dropped; the CLIP
    teacher is not part of the official model (nor of ``ITPNClip``'s state dict)."""
    out = _route_keys(state, (("encoder.", ITPN_ENCODER_PREFIXES), ("pyramid.", ITPN_PYRAMID_PREFIXES),
                              ("", ITPN_CLIP_HEAD_PREFIXES)),
                      drop=DERIVED_BUFFERS, method="iTPN-CLIP", source="itpn_clip modeling_pretrain.py")
    for key in ("encoder.absolute_pos_embed", "lm_head.weight", "cls_pt_layers.0.attn.qkv.weight"):
        _require(out, key, "iTPN-CLIP", "patch_embed, blocks.*, lm_head, cls_pt_layers.*")
    return out


CONVERTERS: dict[str, Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "mae": _convert_mae,
    "simmim": _convert_simmim,
    "mixmae": _convert_mixmim,
    "mixmim": _convert_mixmim,
    "itpn": _convert_itpn,
    "itpn_clip": _convert_itpn_clip,
}


def convert_official(method: str, state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Map an official pretraining checkpoint of ``method`` to this project's pretraining-model keys.

    ``state_dict`` may be the file's whole content (``{'model': ...}``). Raises :class:`ConfigError`
    naming the method for a method without a converter or a state dict of another layout.
    """
    if method not in CONVERTERS:
        raise ConfigError("method", method, ", ".join(sorted(CONVERTERS)), "no official-checkpoint converter")
    return CONVERTERS[method](unwrap_state_dict(state_dict))


# --------------------------------------------------------------------------- resizing


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
