"""SimMIM's ViT encoder (BEiT-style), built from timm's BEiT layers.

Follows ``VisionTransformerForSimMIM`` in microsoft/SimMIM ``models/simmim.py`` and
``models/vision_transformer.py`` with the pretraining config (``USE_APE=False``, ``USE_RPB=False``,
``USE_SHARED_RPB=True``, ``INIT_VALUES=0.1``, ``USE_MEAN_POOLING=False``, LayerNorm eps 1e-6):

    patch conv -> hidden tokens replaced by ``mask_token`` -> prepend ``cls_token`` (no absolute
    position embedding) -> blocks with one relative position bias shared by all blocks, layer scale
    ``gamma_1/gamma_2`` (0.1) and q/v biases (k has none) -> LayerNorm.

timm's ``timm.models.beit`` ``Block`` and ``RelativePositionBias`` have exactly these semantics and
the official parameter names (``cls_token``, ``mask_token``, ``patch_embed.proj``,
``rel_pos_bias.relative_position_bias_table`` ((2*gh-1)*(2*gw-1)+3, heads),
``blocks.{i}.{norm1,attn.qkv.weight,attn.q_bias,attn.v_bias,attn.proj,gamma_1,gamma_2,norm2,mlp.fc1,mlp.fc2}``,
``norm``), so an official checkpoint's ``encoder.*`` keys load once the ``relative_position_index``
buffer is dropped. Attention runs through timm's fused ``scaled_dot_product_attention``.

Initialisation is the official one, including its quirk: ``VisionTransformerForSimMIM`` overrides
``_trunc_normal_`` with bounds ``a=-std, b=std``, so every trunc-normal init (cls and mask tokens,
Linear and the patch conv, all std 0.02) is truncated at +-1 sigma; biases are zero, LayerNorms 1/0,
the shared relative position bias table zero, and ``attn.proj``/``mlp.fc2`` weights of block ``i``
are divided by ``sqrt(2 * (i + 1))`` (BEiT's ``fix_init_weight``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.beit import Block, RelativePositionBias
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.geometry import check_divisible
from mim_lightning.models.backbones.vit import vit_spec_kwargs


def _trunc_normal_one_sigma(tensor: torch.Tensor, std: float = 0.02) -> None:
    """SimMIM-ViT's ``_trunc_normal_``: normal(0, std) truncated at +-std."""
    trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


class SimMIMViTEncoder(nn.Module):
    """BEiT-style ViT for SimMIM: ``forward_tokens(images, mask) -> (B, 1 + L, D)`` (cls first).

    Args:
        img_size: input size, a multiple of ``patch_size``.
        patch_size, embed_dim, depth, num_heads, mlp_ratio: the ViT sizes (``conf/backbone/vit_*.yaml``).
        init_values: layer-scale init (official 0.1); None disables layer scale.
        drop_path_rate: stochastic depth, linear over the blocks (official ViT-B pretraining: 0.1).
        use_mask_token: add SimMIM's ``mask_token`` (for finetuning, build without it).

    ``stride`` equals the patch size (16 for ViT-B) and ``num_features`` the width.
    """

    def __init__(self, img_size: int | Sequence[int], patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, init_values: float | None = 0.1,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, in_chans: int = 3, use_mask_token: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ConfigError("backbone.num_heads", num_heads, f"a head count dividing the width {embed_dim}")
        self.patch_size = self.stride = int(patch_size)
        self.img_size = check_divisible(img_size, self.patch_size, "data.image_size", "backbone.patch_size")
        self.grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.embed_dim = self.num_features = int(embed_dim)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.patch_embed = PatchEmbed(img_size=self.img_size, patch_size=self.patch_size, in_chans=in_chans,
                                      embed_dim=self.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if use_mask_token else None
        self.rel_pos_bias = RelativePositionBias(window_size=self.grid, num_heads=num_heads)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim=self.embed_dim, num_heads=num_heads, qkv_bias=qkv_bias, mlp_ratio=mlp_ratio, drop_path=rate,
                  init_values=init_values, norm_layer=norm_layer, window_size=None)
            for rate in rates
        )
        self.norm = norm_layer(self.embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init (see the module docstring)."""
        _trunc_normal_one_sigma(self.cls_token)
        if self.mask_token is not None:
            _trunc_normal_one_sigma(self.mask_token)
        self.apply(_init_simmim_vit_weights)
        nn.init.zeros_(self.rel_pos_bias.relative_position_bias_table)
        for block in self.blocks:
            block.reset_parameters()  # layer scale back to init_values
            block.attn.reset_parameters()  # zero q/v biases
        with torch.no_grad():
            for layer_id, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch conv, then the mask token at hidden positions: (B, L, D), no cls.

        ``mask`` (B, gh, gw) bool/0-1, True = hidden, on the patch grid. Visible tokens are exactly
        the patch embedding; hidden ones are the mask token.
        """
        x = self.patch_embed(images)
        if mask is None:
            return x
        if self.mask_token is None:
            raise ConfigError("mask", "given", "no mask for an encoder built with use_mask_token=False")
        weight = mask.reshape(x.shape[0], -1, 1).type_as(x)
        return x * (1.0 - weight) + self.mask_token.to(x.dtype) * weight

    def forward_tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> final-norm tokens (B, 1 + L, D), cls first."""
        x = self.embed(images, mask)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        bias = self.rel_pos_bias()
        for block in self.blocks:
            x = block(x, shared_rel_pos_bias=bias)
        return self.norm(x)

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L, D) tokens -> (B, D, gh, gw) map of the patch tokens (cls dropped)."""
        patches = tokens[:, 1:]
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, *self.grid)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> feature map (B, D, H/p, W/p), as the official encoder."""
        return self.to_map(self.forward_tokens(images, mask))


def _init_simmim_vit_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        _trunc_normal_one_sigma(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def simmim_vit_from_spec(backbone: Mapping[str, Any], img_size: int | Sequence[int], **overrides: Any) -> SimMIMViTEncoder:
    """Build a :class:`SimMIMViTEncoder` from a ``conf/backbone/vit_*.yaml`` mapping."""
    return SimMIMViTEncoder(**{**vit_spec_kwargs(backbone, img_size), **overrides})
