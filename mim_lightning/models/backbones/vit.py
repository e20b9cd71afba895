"""Vision Transformer encoder from timm layers, with MAE's fixed sin-cos position embedding.

Parameter names are timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.*``,
``norm``), so the encoder's state dict loads into ``timm.create_model('vit_*')`` and MAE's official
encoder checkpoints load into it (attention runs through timm's fused ``scaled_dot_product_attention``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from mim_lightning.geometry import check_divisible, to_pair
from mim_lightning.models.pos_embed import sincos_2d


class ViTEncoder(nn.Module):
    """ViT with a cls token and a frozen 2-D sin-cos ``pos_embed`` (zero row for cls), as MAE.

    ``forward(images, keep_ids)`` embeds the patches, adds positions, keeps only the patches named in
    ``keep_ids`` (B, K) when given, prepends cls and runs the blocks and the final norm:
    output (B, 1 + K, D), or (B, 1 + L, D) without ``keep_ids``.
    """

    def __init__(self, img_size: int | Sequence[int], patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 in_chans: int = 3) -> None:
        super().__init__()
        self.img_size = check_divisible(img_size, patch_size, "data.image_size", "backbone.patch_size")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.patch_embed = PatchEmbed(img_size=self.img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, norm_layer=norm_layer) for rate in rates
        )
        self.norm = norm_layer(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE's ``initialize_weights`` for the encoder part."""
        self.pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid, cls_token=True).unsqueeze(0))
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(init_linear_and_norm)
        init_linear_and_norm(self.norm)

    def forward(self, images: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        if keep_ids is not None:
            x = torch.gather(x, 1, keep_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform Linear weights (the fused qkv as one matrix), zero
    biases, LayerNorm weight 1 / bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def vit_spec_kwargs(backbone: Mapping[str, Any], img_size: int | Sequence[int]) -> dict[str, Any]:
    """The size arguments of a ViT encoder from a ``conf/backbone/vit_*.yaml`` mapping."""
    return dict(
        img_size=to_pair(img_size),
        patch_size=int(backbone["patch_size"]),
        embed_dim=int(backbone["embed_dim"]),
        depth=int(backbone["depth"]),
        num_heads=int(backbone["num_heads"]),
        mlp_ratio=float(backbone.get("mlp_ratio", 4.0)),
    )


def vit_from_spec(backbone: Mapping[str, Any], img_size: int | Sequence[int], **overrides: Any) -> ViTEncoder:
    """Build a :class:`ViTEncoder` from a ``conf/backbone/vit_*.yaml`` mapping."""
    return ViTEncoder(**{**vit_spec_kwargs(backbone, img_size), **overrides})
