"""The MixMIM encoder (Sense-X/MixMIM ``models_mixmim.py``): Swin-style stages without shifted windows.

Structure, per the official code:
- timm ``PatchEmbed`` (4px, LayerNorm), a fixed 2-D sin-cos ``absolute_pos_embed`` (not trained),
  four stages of pre-norm window-attention blocks with a relative position bias (RPB) table and an
  MLP, timm ``PatchMerging`` between stages (concat order x0=[0::2,0::2], x1=[1::2,0::2],
  x2=[0::2,1::2], x3=[1::2,1::2], LayerNorm(4C), Linear(4C -> 2C, no bias)) and a final LayerNorm.
- Windows are **never shifted**. LayerNorm eps is PyTorch's default 1e-5 everywhere.
- Init: xavier-uniform Linear weights, zero biases, LayerNorm 1/0, RPB tables trunc-normal std 0.02;
  the patch-embedding conv keeps PyTorch's default init.
- Optional mixing (``forward(images, mask)``): ``mask`` (1, gh, gw) on the *output* grid (total stride
  ``patch_size * 2**(stages-1)``, 32px for Swin) is upsampled (nearest) to every stage; after the patch
  embedding, token positions where the mask is True take the batch-flipped image (sample i takes
  image B-1-i; with an odd batch the middle sample is mixed with itself). In every block of every
  stage a token attends only to the tokens of its window that come from the same source image.

Parameter and buffer names are the official ones (``patch_embed.{proj,norm}``, ``absolute_pos_embed``,
``layers.{s}.blocks.{j}.{norm1,attn.relative_position_bias_table,attn.relative_position_index,attn.qkv,
attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``layers.{s}.downsample.{norm,reduction}``, ``norm``), so an official
encoder state dict loads without renaming or reordering.

Differences from the official code:
- Window size rule. The official block clamps the window to the map when ``min(map) <= window``
  (global attention) and otherwise needs ``window`` to divide the map. Here each stage uses the largest
  window ``k <= min(window, map_h, map_w)`` that divides both map sides. At 224px with [14, 14, 14, 7]
  (maps 56/28/14/7) this is exactly the official 14/14/14(global)/7(global); at 384px with
  [16, 16, 24, 12] too. Where the official code would fail (a map larger than the window and not a
  multiple of it, e.g. 16x16 at 64px) a smaller window is used (8 at 64px, 12 at 192px).
- Same-image attention is a boolean restriction: an additive (nW, N, N) mask, ``-inf`` where the two
  tokens come from different images, is made once per stage and added (with the RPB) to the scores,
  broadcast over the batch (see :mod:`~mim_lightning.models.backbones.window_attention` for the path per
  device and dtype). The official code subtracts 1e30 (65500 in fp16) from the scores; ``-inf`` gives
  exactly zero weight in every dtype (fp32, bf16, fp16), so the restriction is exact under autocast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.geometry import check_divisible, to_pair
from mim_lightning.models.backbones.vit import init_linear_and_norm
from mim_lightning.models.backbones.window_attention import window_attention
from mim_lightning.models.pos_embed import sincos_2d

#: The MixMIM-B/W14 windows at 224px (stages at 56/28/14/7: 16 windows, 4 windows, global, global).
DEFAULT_WINDOWS = (14, 14, 14, 7)


def stage_window(map_size: tuple[int, int], requested: int) -> int:
    """The window used on a ``map_size`` stage: the largest ``k <= min(requested, h, w)`` dividing h and w.

    Equal to the official clamp (``min(map)`` when the map is not larger than the window, global
    attention on square maps) wherever the official code runs; see the module docstring.
    """
    height, width = map_size
    for k in range(min(int(requested), height, width), 0, -1):
        if height % k == 0 and width % k == 0:
            return k
    return 1


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into a ((2w-1)^2, heads) RPB table for an N = w*w window, as Swin's."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows in (batch, row, column) order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, w*w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


def same_image_windows(mask: torch.Tensor, window: int) -> torch.Tensor:
    """(1, H, W) bool mixing mask -> (nW, N, N) bool, True where two tokens of a window come from
    the same source image (both mask values equal)."""
    tokens = window_partition(mask[..., None].to(torch.uint8), window)[..., 0]  # (nW, N)
    return tokens[:, :, None] == tokens[:, None, :]


def same_image_bias(mask: torch.Tensor, window: int) -> torch.Tensor:
    """(1, H, W) bool mixing mask -> (nW, N, N) fp32 additive mask: 0 where two tokens of a window come
    from the same source image, ``-inf`` where not. Made once per stage and batch, shared by the stage's blocks."""
    same = same_image_windows(mask, window)
    return torch.zeros(same.shape, device=mask.device).masked_fill_(~same, float("-inf"))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window x window`` windows with a learned RPB.

    ``forward(x, same_image)``: x (B * nW, N, C) windows of B images (batch-major); ``same_image``
    (nW, N, N) additive mask (0 / -inf, :func:`same_image_bias`) or None, the same for every image: it is
    broadcast over the batch and heads. Tokens attend only where it is 0; the RPB is added first. The path
    (SDPA, or the explicit softmax for bf16 on CPUs with native bf16) is :mod:`~mim_lightning.models.backbones.window_attention`'s.
    """

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias from the table."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, same_image: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if same_image is not None and same_image.dtype == torch.bool:
            same_image = torch.zeros(same_image.shape, device=x.device).masked_fill_(~same_image, float("-inf"))
        x = window_attention(q, k, v, self.relative_position_bias(), same_image)
        return self.proj(x.transpose(1, 2).reshape(bw, n, c))


class MixMIMBlock(nn.Module):
    """Pre-norm window-attention block (no shift): ``x + DropPath(WA(LN(x)))``, ``x + DropPath(MLP(LN(x)))``.

    ``forward(x, same_image)``: x (B, H*W, C) -> (B, H*W, C).
    """

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, same_image: torch.Tensor | None = None) -> torch.Tensor:
        b, length, c = x.shape
        h, w = self.resolution
        windows = window_partition(self.norm1(x).view(b, h, w, c), self.window)
        attended = window_reverse(self.attn(windows, same_image), self.window, h, w).reshape(b, length, c)
        x = x + self.drop_path(attended)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MixMIMLayer(nn.Module):
    """One stage: ``depth`` blocks at ``resolution``, then timm ``PatchMerging`` (except the last stage).

    ``forward(x, mask)``: x (B, H*W, C), mask (1, H, W) bool or None -> (B, H*W/4, 2C) or (B, H*W, C).
    """

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = stage_window(resolution, window)
        self.blocks = nn.ModuleList(
            MixMIMBlock(dim, resolution, num_heads, self.window, mlp_ratio, qkv_bias, rate) for rate in drop_path
        )
        self.downsample = PatchMerging(dim, 2 * dim, norm_layer=nn.LayerNorm) if downsample else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        same_image = None if mask is None else same_image_bias(mask, self.window)  # once per stage, not per block
        for block in self.blocks:
            x = block(x, same_image)
        if self.downsample is not None:
            h, w = self.resolution
            x = self.downsample(x.view(x.shape[0], h, w, x.shape[-1])).flatten(1, 2)
        return x


class MixMIMEncoder(nn.Module):
    """The MixMIM encoder; see the module docstring.

    ``forward(images, mask=None)``: images (B, C, H, W); mask (1, gh, gw) bool on the output grid
    (True = take the batch-flipped image), or None for a plain forward (fine-tuning) -> (B, gh*gw, 8C).

    Args:
        img_size: input size, a multiple of ``patch_size * 2**(stages-1)`` (32 for Swin).
        window_size: per-stage requested windows (official [14, 14, 14, 7] at 224px), clamped by
            :func:`stage_window`.
        mask_attention: restrict attention to same-image tokens when mixing (True, as official;
            False is the MixMAE paper's ablation without masked self-attention).
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 4, embed_dim: int = 128,
                 depths: Sequence[int] = (2, 2, 18, 2), num_heads: Sequence[int] = (4, 8, 16, 32),
                 window_size: Sequence[int] = DEFAULT_WINDOWS, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, in_chans: int = 3, mask_attention: bool = True) -> None:
        super().__init__()
        depths, num_heads, window_size = list(depths), list(num_heads), list(window_size)
        stages = len(depths)
        if stages < 1 or len(num_heads) != stages:
            raise ConfigError("backbone.num_heads", num_heads, f"one head count per stage ({stages} stages in backbone.depths)")
        if len(window_size) != stages:
            raise ConfigError("method.model.window_size", window_size, f"one window per stage ({stages} values), e.g. [14, 14, 14, 7]")
        if any(int(w) < 1 for w in window_size):
            raise ConfigError("method.model.window_size", window_size, "positive window sizes, e.g. [14, 14, 14, 7]")
        self.patch_size = int(patch_size)
        self.stride = self.patch_size * 2 ** (stages - 1)
        self.img_size = check_divisible(img_size, self.stride, "data.image_size",
                                        f"the encoder stride (backbone.patch_size x 2^{stages - 1})")
        self.embed_dim = int(embed_dim)
        self.num_features = self.embed_dim * 2 ** (stages - 1)
        self.mask_attention = bool(mask_attention)
        for stage, heads in enumerate(num_heads):
            dim = self.embed_dim * 2 ** stage
            if heads <= 0 or dim % heads:
                raise ConfigError("backbone.num_heads", num_heads, f"head counts dividing the stage widths "
                                  f"{[self.embed_dim * 2 ** s for s in range(stages)]}")
        self.grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.out_grid = (self.img_size[0] // self.stride, self.img_size[1] // self.stride)
        self.patch_embed = PatchEmbed(self.img_size, self.patch_size, in_chans, self.embed_dim, norm_layer=nn.LayerNorm)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], self.embed_dim),
                                               requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for stage in range(stages):
            scale = 2 ** stage
            resolution = (self.grid[0] // scale, self.grid[1] // scale)
            start = sum(depths[:stage])
            self.layers.append(MixMIMLayer(self.embed_dim * scale, resolution, int(depths[stage]), int(num_heads[stage]),
                                           int(window_size[stage]), mlp_ratio, qkv_bias,
                                           rates[start: start + int(depths[stage])], downsample=stage < stages - 1))
        self.windows = tuple(layer.window for layer in self.layers)
        self.norm = nn.LayerNorm(self.num_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init (RPB tables are drawn in :class:`WindowAttention`)."""
        self.absolute_pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid).unsqueeze(0))
        self.layers.apply(init_linear_and_norm)
        init_linear_and_norm(self.patch_embed.norm)
        init_linear_and_norm(self.norm)

    def stage_masks(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """(1, gh, gw) output-grid mask -> per-stage (1, H_s, W_s) masks (nearest upsampling)."""
        masks = []
        for stage in range(len(self.layers)):
            factor = 2 ** (len(self.layers) - 1 - stage)
            masks.append(mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2))
        return masks

    def check_images(self, images: torch.Tensor) -> None:
        if tuple(images.shape[-2:]) != self.img_size:
            size = images.shape[-1] if images.shape[-1] == images.shape[-2] else tuple(images.shape[-2:])
            raise ConfigError("data.image_size", size, f"{self.img_size[0]}x{self.img_size[1]}, the size the model was built for")

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_images(images)
        x = self.patch_embed(images)  # (B, L1, C)
        masks: list[torch.Tensor | None] = [None] * len(self.layers)
        if mask is not None:
            masks = self.stage_masks(mask.reshape(1, *self.out_grid).bool())
            x = torch.where(masks[0].reshape(1, -1, 1), x.flip(0), x)
            if not self.mask_attention:
                masks = [None] * len(self.layers)
        x = x + self.absolute_pos_embed
        for layer, stage_mask in zip(self.layers, masks):
            x = layer(x, stage_mask)
        return self.norm(x)


def mixmim_from_spec(backbone: Mapping[str, Any], img_size: int | Sequence[int], **overrides: Any) -> MixMIMEncoder:
    """Build a :class:`MixMIMEncoder` from a ``conf/backbone/swin_*.yaml`` mapping (keys patch_size,
    embed_dim, depths, num_heads, mlp_ratio); window sizes and the rest come from ``overrides``."""
    kwargs: dict[str, Any] = dict(
        img_size=to_pair(img_size),
        patch_size=int(backbone["patch_size"]),
        embed_dim=int(backbone["embed_dim"]),
        depths=[int(d) for d in backbone["depths"]],
        num_heads=[int(h) for h in backbone["num_heads"]],
        mlp_ratio=float(backbone.get("mlp_ratio", 4.0)),
    )
    kwargs.update(overrides)
    return MixMIMEncoder(**kwargs)
