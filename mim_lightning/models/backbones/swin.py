"""Swin Transformer (V1) encoder with SimMIM's mask token, built from timm's Swin layers.

The encoder follows ``SwinTransformerForSimMIM`` in microsoft/SimMIM ``models/simmim.py``: a 4x4
patch conv followed by LayerNorm (``patch_norm``), then every hidden token is replaced by one
learnable ``mask_token`` (``x * (1 - w) + mask_token * w``), then the Swin stages (shifted windows
in every second block, patch merging at the end of each stage but the last) and a final LayerNorm.
There is no absolute position embedding (``APE=False`` in all SimMIM configs) and no classifier.

Parameter names are the official ones, so a SimMIM checkpoint's ``encoder.*`` keys load after
dropping the buffers ``relative_position_index`` and ``attn_mask`` (non-persistent here):

    patch_embed.proj.{weight,bias}      patch_embed.norm.{weight,bias}      mask_token
    layers.{i}.blocks.{j}.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}.*
    layers.{i}.downsample.{norm,reduction}.*  (stages 0..S-2; ``reduction`` has no bias)
    norm.{weight,bias}

timm's own ``SwinTransformer`` puts the patch merging at the *start* of a stage, so its
``layers.{i+1}.downsample.*`` is this encoder's (and the official) ``layers.{i}.downsample.*``;
every other name is the same. timm's ``PatchMerging`` concatenates the 2x2 neighbours in the
official order (x0=[0::2,0::2], x1=[1::2,0::2], x2=[0::2,1::2], x3=[1::2,1::2]), so no weight
permutation is needed. Blocks run on (B, H, W, C) tensors. Window attention (relative position bias, plus
the -100 shift mask in shifted blocks, broadcast over the batch) takes the fastest path for the device and
dtype, see :mod:`~mim_lightning.models.backbones.window_attention`: ``F.scaled_dot_product_attention`` on
CUDA and the CPU, the explicit softmax for bf16 on CPUs with native bf16 units. Same math
as the official explicit softmax, not bit-identical. :func:`use_sdpa_window_attention` switches timm's
``WindowAttention`` modules (here and in timm's ``SwinTransformer`` classifier) to it.

Windows follow the official rule: a stage whose map is not larger than the window attends
globally (window = map side, no shift). Maps that are not a multiple of the window are rejected
with a :class:`ConfigError` (the official code asserts; timm would zero-pad), see :func:`stage_windows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.geometry import check_divisible, to_pair
from mim_lightning.models.backbones.window_attention import window_attention

#: The image size of SimMIM's Swin pretraining configs; ``backbone.simmim_window_size`` is the window there.
SIMMIM_SWIN_IMAGE_SIZE = 192


class FastWindowAttention(WindowAttention):
    """timm's ``WindowAttention`` (same parameters, buffers and math) whose attention runs on the path
    :func:`~mim_lightning.models.backbones.window_attention.attention_path` picks for the device and dtype,
    with the shift mask broadcast over the batch instead of expanded to every window of every image."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        windows, n, c = x.shape
        q, k, v = self.qkv(x).reshape(windows, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._get_rel_pos_bias()
        x = window_attention(q, k, v, bias, mask, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(windows, n, -1)))


def use_sdpa_window_attention(model: nn.Module) -> int:
    """Switch every timm Swin ``WindowAttention`` in ``model`` to :class:`FastWindowAttention` (SDPA on
    CUDA and mostly on the CPU, explicit softmax for bf16 on native-bf16 CPUs; see :mod:`~mim_lightning.models.backbones.window_attention`)
    and mark it ``fused_attn`` (it no longer runs timm's own explicit branch). Same parameters and math.
    Attention dropout is not supported (0 in every Swin recipe here). Returns the number switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, WindowAttention) and not isinstance(module, FastWindowAttention):
            module.__class__ = FastWindowAttention
            module.fused_attn = True
            switched += 1
    return switched


use_fast_window_attention = use_sdpa_window_attention


def _plan_windows(grid: tuple[int, int], num_stages: int, window_size: int) -> tuple[list[tuple[int, int]], int | None]:
    """``(windows, None)``, or ``(windows so far, index of the first stage whose map the window does not tile)``."""
    result = []
    for stage in range(num_stages):
        height, width = grid[0] // 2**stage, grid[1] // 2**stage
        if min(height, width) <= window_size:
            window, shift = min(height, width), 0
        else:
            window, shift = window_size, window_size // 2
        if height % window or width % window:
            return result, stage
        result.append((window, shift))
    return result, None


def stage_windows(grid: tuple[int, int], num_stages: int, window_size: int, patch_size: int = 4) -> list[tuple[int, int]]:
    """Per stage ``(window, shift)`` for a patch grid ``grid`` and a nominal ``window_size``.

    As the official ``SwinTransformerBlock``: when ``min(map) <= window_size`` the window is the map's
    smaller side and there is no shift (global attention); otherwise the window is ``window_size`` and
    odd blocks shift by ``window_size // 2``. Raises :class:`ConfigError` when a stage map is not a
    multiple of its window (the official code asserts there; timm would zero-pad).
    """
    if window_size < 1:
        raise ConfigError("method.model.window_size", window_size, "a positive integer, e.g. 6 (7 at 224px)")
    windows, bad = _plan_windows(grid, num_stages, window_size)
    if bad is not None:
        height, width = grid[0] // 2**bad, grid[1] // 2**bad
        raise ConfigError(
            "data.image_size", _size_of(grid, patch_size), compatible_sizes(window_size, num_stages, patch_size),
            f"the Swin stage-{bad + 1} map {height}x{width} is not a multiple of method.model.window_size={window_size}")
    return windows


def _size_of(grid: tuple[int, int], patch_size: int) -> int | tuple[int, int]:
    size = (grid[0] * patch_size, grid[1] * patch_size)
    return size[0] if size[0] == size[1] else size


def compatible_sizes(window_size: int, num_stages: int = 4, patch_size: int = 4, count: int = 4) -> str:
    """A short list of square image sizes that work with ``window_size`` (for error messages)."""
    stride = patch_size * 2 ** (num_stages - 1)
    found = [str(size) for size in range(stride, 64 * stride + 1, stride)
             if _plan_windows((size // patch_size,) * 2, num_stages, window_size)[1] is None][:count]
    hint = ", ".join(found) if found else f"none up to {64 * stride}px"
    return f"{hint} ... for window {window_size}, or another method.model.window_size (null scales it with the image)"


class SwinStage(nn.Module):
    """One official Swin stage: ``blocks`` (timm ``SwinTransformerBlock``) then ``downsample``
    (timm ``PatchMerging``: 2x2 concat, LayerNorm(4C), Linear(4C -> 2C, no bias)) or None.

    (B, H, W, C) -> (B, H/2, W/2, 2C), or (B, H, W, C) for the last stage.
    """

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int, shift: int,
                 mlp_ratio: float, qkv_bias: bool, drop_path: Sequence[float], downsample: bool,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim=dim, input_resolution=resolution, num_heads=num_heads, window_size=window,
                                 shift_size=0 if index % 2 == 0 else shift, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                 drop_path=drop_path[index], norm_layer=norm_layer)
            for index in range(depth)
        )
        self.downsample = PatchMerging(dim=dim, out_dim=2 * dim, norm_layer=norm_layer) if downsample else None
        use_sdpa_window_attention(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class SwinEncoder(nn.Module):
    """Swin-V1 encoder for SimMIM: ``forward_tokens(images, mask) -> (B, H/s, W/s, C_out)``.

    Args:
        img_size: input size, a multiple of the encoder stride ``patch_size * 2**(stages-1)`` (32).
        patch_size: 4 for every Swin size.
        embed_dim, depths, num_heads, mlp_ratio: the Swin sizes (``conf/backbone/swin_*.yaml``).
        window_size: nominal window (SimMIM: 6 at 192px for T/S/B, 12 for L); clamped per stage.
        drop_path_rate: stochastic depth, linear over all blocks (0 in SimMIM's Swin pretraining).
        use_mask_token: add SimMIM's ``mask_token`` (for finetuning, build without it).

    ``stride`` is the total downsampling (32) and ``num_features`` the output width (8 x embed_dim).
    Norms are ``nn.LayerNorm`` with the default eps 1e-5, as the official Swin.
    """

    def __init__(self, img_size: int | Sequence[int], patch_size: int = 4, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0, in_chans: int = 3,
                 use_mask_token: bool = True) -> None:
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        if len(depths) != len(num_heads) or not depths or min(depths) < 1:
            raise ConfigError("backbone.depths", depths, f"one positive depth per stage, as many as backbone.num_heads ({num_heads})")
        self.num_stages = len(depths)
        self.patch_size = int(patch_size)
        self.stride = self.patch_size * 2 ** (self.num_stages - 1)
        self.img_size = check_divisible(img_size, self.stride, "data.image_size", "the Swin encoder stride")
        self.grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.embed_dim = int(embed_dim)
        dims = [self.embed_dim * 2**stage for stage in range(self.num_stages)]
        for stage, (dim, heads) in enumerate(zip(dims, num_heads)):
            if heads < 1 or dim % heads:
                raise ConfigError("backbone.num_heads", num_heads, f"head counts dividing the stage widths {dims}",
                                  f"stage {stage + 1} has width {dim}")
        self.num_features = dims[-1]
        self.window_size = int(window_size)
        self.windows = stage_windows(self.grid, self.num_stages, self.window_size, self.patch_size)

        self.patch_embed = PatchEmbed(img_size=self.img_size, patch_size=self.patch_size, in_chans=in_chans,
                                      embed_dim=self.embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if use_mask_token else None
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for stage in range(self.num_stages):
            window, shift = self.windows[stage]
            start = sum(depths[:stage])
            self.layers.append(SwinStage(
                dims[stage], (self.grid[0] // 2**stage, self.grid[1] // 2**stage), depths[stage], num_heads[stage],
                window, shift, mlp_ratio, qkv_bias, rates[start: start + depths[stage]],
                downsample=stage < self.num_stages - 1))
        self.norm = nn.LayerNorm(self.num_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: trunc-normal(0.02) Linear weights, zero biases, LayerNorm 1/0,
        trunc-normal(0.02) mask token and relative-position tables; the patch conv keeps PyTorch's
        default init (the official ``_init_weights`` touches only Linear and LayerNorm)."""
        self.apply(_init_swin_weights)
        for stage in self.layers:
            for block in stage.blocks:
                trunc_normal_(block.attn.relative_position_bias_table, std=0.02)
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch conv + LayerNorm, then the mask token at hidden positions: (B, gh, gw, C).

        ``mask`` (B, gh, gw) bool/0-1, True = hidden, on the 4px patch grid. Visible tokens are
        ``x * 1 + token * 0`` (exactly the patch embedding); hidden ones are the mask token.
        """
        x = self.patch_embed(images)
        if mask is None:
            return x
        if self.mask_token is None:
            raise ConfigError("mask", "given", "no mask for an encoder built with use_mask_token=False")
        weight = mask.reshape(x.shape[0], *x.shape[1:3], 1).type_as(x)
        return x * (1.0 - weight) + self.mask_token.to(x.dtype) * weight

    def forward_tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> final-norm features (B, H/stride, W/stride, num_features)."""
        x = self.embed(images, mask)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) features -> (B, C, h, w) map."""
        return tokens.permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> feature map (B, num_features, H/stride, W/stride), as the official encoder."""
        return self.to_map(self.forward_tokens(images, mask))


def _init_swin_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def simmim_window_size(backbone: Mapping[str, Any], img_size: int | Sequence[int]) -> int:
    """The default window for an image size: ``backbone.simmim_window_size`` (the window at 192px:
    6 for Swin-T/S/B, 12 for Swin-L) scaled with the image, so every stage keeps the number of windows
    of the 192px recipe: 6 -> 7 at 224px (the Swin fine-tuning window), 2 at 64px; 12 -> 14 at 224px."""
    reference = int(backbone.get("simmim_window_size", 6))
    stride = int(backbone.get("patch_size", 4)) * 2 ** (len(backbone["depths"]) - 1)
    side = min(check_divisible(img_size, stride, "data.image_size", "the Swin encoder stride"))
    window, remainder = divmod(reference * side, SIMMIM_SWIN_IMAGE_SIZE)
    if remainder or window < 1:
        raise ConfigError("method.model.window_size", None, "an explicit window size for this image size",
                          f"backbone.simmim_window_size={reference} does not scale to {side}px")
    return window


def swin_from_spec(backbone: Mapping[str, Any], img_size: int | Sequence[int], window_size: int | None = None,
                   **overrides: Any) -> SwinEncoder:
    """Build a :class:`SwinEncoder` from a ``conf/backbone/swin_*.yaml`` mapping.

    ``window_size=None`` picks :func:`simmim_window_size` for the image size.
    """
    if window_size is None:
        window_size = simmim_window_size(backbone, img_size)
    kwargs = dict(
        img_size=to_pair(img_size),
        patch_size=int(backbone.get("patch_size", 4)),
        embed_dim=int(backbone["embed_dim"]),
        depths=list(backbone["depths"]),
        num_heads=list(backbone["num_heads"]),
        mlp_ratio=float(backbone.get("mlp_ratio", 4.0)),
        window_size=int(window_size),
    )
    kwargs.update(overrides)
    return SwinEncoder(**kwargs)


def swin_to_timm(encoder_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official/SimMIM Swin encoder keys -> timm ``SwinTransformer`` keys (merging moves one stage up)."""
    out = {}
    for key, value in encoder_state.items():
        if key == "mask_token" or key.endswith(("relative_position_index", "attn_mask")):
            continue
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) + 1)
        out[".".join(parts)] = value
    return out


def timm_to_swin(timm_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`swin_to_timm` (timm ``layers.{i+1}.downsample`` -> official ``layers.{i}.downsample``)."""
    out = {}
    for key, value in timm_state.items():
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        out[".".join(parts)] = value
    return out
