"""HiViT (hierarchical ViT), the backbone of iTPN, following sunsmarterjie/iTPN ``models_itpn.py`` and
``itpn_clip/modeling_pretrain.py``.

Each ``patch_size`` (16 px) *mask unit* is embedded as a 4x4 grid of 4 px sub-tokens by one
``Conv2d(k = s = patch/4)``, so the token tensor is ``(B, N, 4, 4, C/4)`` with ``N`` units.
Two stems of MLP-only blocks (``x + MLP(LN(x))``: no attention, no norm1, no mixing across units or
sub-tokens) run at widths C/4 and C/2, each followed by a ``PatchMerge`` that concatenates the 2x2
sub-tokens *inside* a unit (Swin's x0, x1, x2, x3 order), LN(4c) and Linear(4c -> 2c, no bias). After
the second merge every unit is one C-wide token and the *main stage* of ``depth`` global-attention
blocks runs on ``(B, N, C)`` plus an absolute position embedding (and, optionally, a relative position
bias). Since nothing before the main stage mixes units, hidden units can be dropped right after the
patch embedding (MAE-style): :meth:`HiViT.forward_stem` takes ``keep_ids``.

Parameter names are the official ones (``patch_embed.proj/norm``, ``absolute_pos_embed``, one flat
``blocks`` list with the two ``PatchMerge`` at indices ``mlp_depth[0]`` and ``sum(mlp_depth) + 1``,
``norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``gamma_1/gamma_2`` for layer scale,
``attn.relative_position_bias_table``), so official checkpoints map onto these keys one-to-one; the
``relative_position_index`` is a non-persistent buffer (derived, never stored).

Sizes (``conf/backbone/hivit_*.yaml``): B = iTPN-B "3324" (C 512, MLP stems 3 + 3, 24 main blocks,
8 heads), L = iTPN-L "2240" (768, 2 + 2, 40, 12). The official code has no T/S; here T and S take the
HiViT paper's widths and stage counts (C 384, 6 heads; T 1 + 1 + 10, S 2 + 2 + 20).

Differences from the official code (same function, different kernels):
- Attention runs through ``F.scaled_dot_product_attention`` (the relative position bias is its additive
  float mask) instead of an explicit fp32 softmax.
- Rectangular unit grids are allowed (the official asserts a square grid); the RPE index generalises
  as Swin's does.
- Position embedding when units are dropped. The official ``interpolate_pos_encoding`` (DINO's
  resolution interpolation) returns ``absolute_pos_embed`` unchanged only when the main stage holds all
  ``N`` units; with the kept units of masked pretraining (49 of 196) it always resamples the table with
  ``F.interpolate(scale_factor=(g + 0.1) / g, mode="bicubic")``, g = 14: the output is again g x g, but
  the sampling points move by up to ~0.1 unit, so the main stage sees a smoothed and shifted copy of the
  stored table (max change 0.10 on the sin-cos init, whose values are in [-1, 1]; 1.7 % in norm).
  ``official_pos_resample=True`` reproduces this (:func:`official_resampled_pos_embed`; on for
  iTPN-pixel pretraining, so that losses equal the official ones on the same weights); ``False`` adds
  the stored table, which then is the very table that finetuning, the exported encoder and any run on
  all units add (the official code, too, adds the raw table whenever all units are present). The
  resampling is computed in fp32 outside autocast (the official runs it on the fp32 parameter, which
  autocast leaves in fp32) and cast back to the table's dtype.
"""

from __future__ import annotations

import contextlib

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.geometry import check_divisible, to_pair
from mim_lightning.models.pos_embed import sincos_2d

#: Sub-tokens per side of a mask unit (two 2x in-unit merges: 4 -> 2 -> 1).
INNER_PATCHES = 4
APE_INITS = ("sincos", "trunc_normal")


def init_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """iTPN's ``_init_weights``: Linear weights ``trunc_normal_(std=0.02)`` (cut at +-2), zero biases,
    LayerNorm 1 / 0. Convolutions keep PyTorch's default init, as in the official code."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """(L, L) long index into a ((2gh-1) * (2gw-1))-row bias table for a row-major gh x gw grid."""
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)


def official_resampled_pos_embed(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The official ``interpolate_pos_encoding`` on a (1, gh*gw, C) table stored on its own ``grid``:
    bicubic ``F.interpolate`` with ``scale_factor = ((gh + 0.1) / gh, (gw + 0.1) / gw)`` (the official
    ``(h + 0.1) / sqrt(N)`` per axis, which is the same for the square grids it supports), so that
    the output is gh x gw again but sampled at slightly shifted points. Differentiable (the parameter
    gets the gradient through the resampling, as officially); computed in fp32 (fp64 for an fp64
    table) with autocast off and returned in ``table.dtype``."""
    gh, gw = grid
    dim = table.shape[-1]
    work = torch.promote_types(table.dtype, torch.float32)
    device = table.device.type
    # autocast knows real devices only (a meta-device model, e.g. for FLOP counting, has none to turn off)
    no_autocast = torch.autocast(device_type=device, enabled=False) if device in ("cpu", "cuda", "xpu", "mps") \
        else contextlib.nullcontext()
    with no_autocast:
        x = table.to(work).reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
        x = F.interpolate(x, scale_factor=((gh + 0.1) / gh, (gw + 0.1) / gw), mode="bicubic", align_corners=False)
    # floor(g * (g + 0.1) / g) == g for every g >= 1, so the shape always comes back
    assert tuple(x.shape[-2:]) == (gh, gw), (tuple(x.shape), grid)
    return x.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(table.dtype)


class Attention(nn.Module):
    """Global multi-head self-attention with an optional relative position bias table (zeros at init).

    ``forward(x, rpe_index)``: x (B, N, C); rpe_index (N, N) or (B, N, N) indices into the table, or None.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rpe_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if rpe_grid is not None:
            size = (2 * rpe_grid[0] - 1) * (2 * rpe_grid[1] - 1)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(size, num_heads))
        else:
            self.relative_position_bias_table = None

    def forward(self, x: torch.Tensor, rpe_index: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = None
        if self.relative_position_bias_table is not None and rpe_index is not None:
            bias = self.relative_position_bias_table[rpe_index]  # (..., N, N, heads)
            bias = bias.reshape(-1, length, length, self.num_heads).permute(0, 3, 1, 2).to(qkv.dtype)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(batch, length, dim))


class HiViTBlock(nn.Module):
    """iTPN's ``BlockWithRPE``. With ``num_heads == 0`` it is an MLP-only block (no attention and no
    norm1): ``x + drop_path(gamma_2 * MLP(LN(x)))`` on any (..., C) tensor. Otherwise a pre-norm
    transformer block on (B, N, C). ``layer_scale_init`` adds ``gamma_1`` (attention blocks only) and
    ``gamma_2`` initialised to that value, as the CLIP variant's ``init_values``."""

    def __init__(self, dim: int, num_heads: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0,
                 norm_eps: float = 1e-6, rpe_grid: tuple[int, int] | None = None, layer_scale_init: float | None = None) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.with_attn = num_heads > 0
        self.norm1 = norm_layer(dim) if self.with_attn else None
        self.attn = Attention(dim, num_heads, qkv_bias, rpe_grid) if self.with_attn else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init))) if self.with_attn else None
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, rpe_index: torch.Tensor | None = None) -> torch.Tensor:
        if self.attn is not None:
            y = self.attn(self.norm1(x), rpe_index)
            x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> (B, N, 4, 4, dim): each ``patch_size`` unit as 4x4 sub-tokens of
    ``patch_size/4`` px (row-major units, row-major sub-tokens), then LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.patch_size = patch_size
        step = patch_size // INNER_PATCHES
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=step, stride=step)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        gh, gw = images.shape[2] // self.patch_size, images.shape[3] // self.patch_size
        x = self.proj(images)
        x = x.reshape(batch, -1, gh, INNER_PATCHES, gw, INNER_PATCHES).permute(0, 2, 4, 3, 5, 1)
        return self.norm(x.reshape(batch, gh * gw, INNER_PATCHES, INNER_PATCHES, -1))


class PatchMerge(nn.Module):
    """In-unit 2x2 merge: (B, N, h, w, c) -> (B, N, h/2, w/2, 2c) via concat [x0, x1, x2, x3], LN(4c),
    Linear(4c -> 2c, no bias). Never mixes different units."""

    def __init__(self, dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], dim=-1)
        return self.reduction(self.norm(x))


class HiViT(nn.Module):
    """The HiViT encoder (no classifier head, no final norm: iTPN feeds the main-stage output to its pyramid).

    Args:
        img_size: input size (int or (H, W)), a multiple of ``patch_size``.
        patch_size: the mask unit in pixels (16), a multiple of 4.
        embed_dim: main-stage width C (stems run at C/4 and C/2).
        mlp_depth: MLP-only blocks in the two stems, e.g. (3, 3).
        depth: main-stage attention blocks.
        num_heads: heads of the main stage.
        bridge_mlp_ratio: MLP ratio of the stem blocks (3 in iTPN); ``mlp_ratio`` that of the main blocks (4).
        drop_path_rate: stochastic depth, linear over all ``sum(mlp_depth) + depth`` blocks.
        rpe: relative position bias tables in the main blocks (iTPN-CLIP pretraining and finetuning).
        ape_init: ``sincos`` (iTPN-pixel: learnable, sin-cos initialised) or ``trunc_normal``
            (iTPN-CLIP's ``modeling_pretrain.py``: learnable, trunc-normal std 0.02).
        layer_scale_init: ``gamma`` init of every stem and main block (CLIP variant: 0.1), or None.
        official_pos_resample: when fewer than all units enter the main stage (``keep_ids`` with K < N),
            add :func:`official_resampled_pos_embed` of the table instead of the stored table, as the
            official ``interpolate_pos_encoding`` does (see the module docstring). With all units
            (finetuning, iTPN-CLIP, export, ``keep_ids=None``) the stored table is added either way.

    Shapes: :meth:`forward_stem` (B, 3, H, W) -> (B, K, C) plus the two stem features saved before
    each merge, (B, K, 4, 4, C/4) and (B, K, 2, 2, C/2) (K = kept units, N without ``keep_ids``);
    :meth:`forward_main` (B, K, C) -> (B, K, C).
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, embed_dim: int = 512,
                 mlp_depth: Sequence[int] = (3, 3), depth: int = 24, num_heads: int = 8, bridge_mlp_ratio: float = 3.0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 rpe: bool = False, ape_init: str = "sincos", layer_scale_init: float | None = None, in_chans: int = 3,
                 official_pos_resample: bool = False) -> None:
        super().__init__()
        if ape_init not in APE_INITS:
            raise ConfigError("method.model.ape_init", ape_init, ", ".join(APE_INITS))
        self.img_size = check_divisible(img_size, patch_size, "data.image_size", "backbone.patch_size")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.dims = (embed_dim // 4, embed_dim // 2, embed_dim)
        self.mlp_depth = tuple(int(d) for d in mlp_depth)
        self.depth = int(depth)
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_units = self.grid[0] * self.grid[1]
        self.ape_init = ape_init
        self.rpe = bool(rpe)
        if not isinstance(official_pos_resample, bool):
            raise ConfigError("method.model.official_pos_resample", official_pos_resample, "true or false")
        self.official_pos_resample = official_pos_resample

        self.patch_embed = PatchEmbed(patch_size, in_chans, self.dims[0], norm_eps)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.num_units, embed_dim))
        self.register_buffer("relative_position_index", relative_position_index(self.grid) if self.rpe else None,
                             persistent=False)
        rates = iter(torch.linspace(0, drop_path_rate, sum(self.mlp_depth) + self.depth, device="cpu").tolist())
        blocks: list[nn.Module] = []
        for stage in range(2):
            blocks += [HiViTBlock(self.dims[stage], 0, bridge_mlp_ratio, qkv_bias, next(rates), norm_eps,
                                  layer_scale_init=layer_scale_init) for _ in range(self.mlp_depth[stage])]
            blocks.append(PatchMerge(self.dims[stage], norm_eps))
        blocks += [HiViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, next(rates), norm_eps,
                              self.grid if self.rpe else None, layer_scale_init) for _ in range(self.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.reset_parameters()

    @property
    def stem_blocks(self) -> nn.ModuleList:
        return self.blocks[: len(self.blocks) - self.depth]

    @property
    def main_blocks(self) -> nn.ModuleList:
        return self.blocks[len(self.blocks) - self.depth:]

    def reset_parameters(self) -> None:
        self.blocks.apply(init_trunc_normal)
        init_trunc_normal(self.patch_embed.norm)
        if self.ape_init == "sincos":
            self.absolute_pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid).unsqueeze(0))
        else:
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        for block in self.main_blocks:
            if block.attn.relative_position_bias_table is not None:
                nn.init.zeros_(block.attn.relative_position_bias_table)

    def forward_stem(self, images: torch.Tensor, keep_ids: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch embedding, then (after keeping only the units in ``keep_ids`` (B, K), when given) the two
        MLP stems. Returns the (B, K, C) unit tokens and the stem features saved before each merge."""
        x = self.patch_embed(images)
        if keep_ids is not None:
            x = torch.gather(x, 1, keep_ids[:, :, None, None, None].expand(-1, -1, *x.shape[2:]))
        features = []
        for block in self.stem_blocks:
            if isinstance(block, PatchMerge):
                features.append(x)
            x = block(x)
        return x[:, :, 0, 0], features

    def pos_embed(self, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(1, N, C), or (B, K, C) gathered for ``keep_ids``. With ``official_pos_resample`` and K < N
        the gathered rows come from the resampled table (a shape test: no device sync)."""
        if keep_ids is None:
            return self.absolute_pos_embed
        table = self.absolute_pos_embed
        if self.official_pos_resample and keep_ids.shape[1] < self.num_units:
            table = official_resampled_pos_embed(table, self.grid)
        table = table.expand(keep_ids.shape[0], -1, -1)
        return torch.gather(table, 1, keep_ids[:, :, None].expand(-1, -1, self.embed_dim))

    def rpe_index(self, keep_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The relative-position index for all units (N, N) or the kept ones (B, K, K); None without RPE."""
        if self.relative_position_index is None:
            return None
        if keep_ids is None:
            return self.relative_position_index
        return self.relative_position_index[keep_ids[:, :, None], keep_ids[:, None, :]]

    def forward_main(self, x: torch.Tensor, keep_ids: torch.Tensor | None = None, taps: Sequence[int] = ()
                     ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Add the (gathered) position embedding and run the main blocks on (B, K, C).

        Returns the output and ``{i: output of main block i}`` for each index in ``taps``.
        """
        x = x + self.pos_embed(keep_ids)
        rpe_index = self.rpe_index(keep_ids)
        tapped = {}
        for index, block in enumerate(self.main_blocks):
            x = block(x, rpe_index)
            if index in taps:
                tapped[index] = x
        return x, tapped

    def forward(self, images: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> main-stage tokens (B, K, C) of the kept units (all N without ``keep_ids``)."""
        x, _ = self.forward_stem(images, keep_ids)
        return self.forward_main(x, keep_ids)[0]


def _positive_int(value: Any, key: str, allowed: str = "a positive integer", minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, allowed)
    return value


def hivit_kwargs(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a ``conf/backbone/hivit_*.yaml`` mapping and turn it into :class:`HiViT` arguments."""
    patch = _positive_int(backbone.get("patch_size"), "backbone.patch_size", "a positive multiple of 4, e.g. 16")
    if patch % INNER_PATCHES:
        raise ConfigError("backbone.patch_size", patch, "a positive multiple of 4, e.g. 16",
                          "each unit holds 4x4 sub-tokens")
    dim = _positive_int(backbone.get("embed_dim"), "backbone.embed_dim", "a positive multiple of 4, e.g. 512")
    if dim % 4:
        raise ConfigError("backbone.embed_dim", dim, "a positive multiple of 4, e.g. 512", "the stems run at C/4 and C/2")
    heads = _positive_int(backbone.get("num_heads"), "backbone.num_heads", f"a head count dividing the width {dim}")
    if dim % heads:
        raise ConfigError("backbone.num_heads", heads, f"a head count dividing the width {dim}")
    mlp_depth = backbone.get("mlp_depth")
    if (not isinstance(mlp_depth, Sequence) or isinstance(mlp_depth, str) or len(mlp_depth) != 2
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in mlp_depth)):
        raise ConfigError("backbone.mlp_depth", mlp_depth, "two non-negative integers, e.g. [3, 3]")
    return dict(
        patch_size=patch,
        embed_dim=dim,
        mlp_depth=tuple(mlp_depth),
        depth=_positive_int(backbone.get("depth"), "backbone.depth"),
        num_heads=heads,
        bridge_mlp_ratio=float(backbone.get("bridge_mlp_ratio", 3.0)),
        mlp_ratio=float(backbone.get("mlp_ratio", 4.0)),
    )


def hivit_from_spec(backbone: Mapping[str, Any], img_size: int | Sequence[int], **overrides: Any) -> HiViT:
    """Build a :class:`HiViT` from a backbone mapping; ``overrides`` set the method's choices
    (``rpe``, ``ape_init``, ``layer_scale_init``, ``drop_path_rate`` ...)."""
    kwargs = hivit_kwargs(backbone)
    kwargs.update(overrides)
    return HiViT(img_size=to_pair(img_size), **kwargs)
