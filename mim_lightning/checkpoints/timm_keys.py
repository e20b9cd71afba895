"""timm names for this project's encoders: model names and ``create_model`` kwargs of a ViT, SimMIM's BEiT-style ViT
and a Swin of given sizes, and the metadata of the two
export formats (timm, and the project's own for encoders timm has no model for)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

#: timm names of the standard ViT sizes (embed_dim, depth, heads) -> size word.
VIT_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
             (1280, 32, 16): "huge"}
BEIT_SIZES = {(768, 12, 12): "base", (1024, 24, 16): "large"}
SWIN_SIZES = {(96, (2, 2, 6, 2)): "tiny", (96, (2, 2, 18, 2)): "small", (128, (2, 2, 18, 2)): "base",
              (192, (2, 2, 18, 2)): "large"}


def _square(size: Any) -> int | list[int]:
    if isinstance(size, (list, tuple)):
        return int(size[0]) if size[0] == size[1] else [int(s) for s in size]
    return int(size)


def vit_timm_spec(backbone: Mapping[str, Any], image_size: Any, global_pool: str = "token") -> tuple[str, dict]:
    """(timm model name, create_model kwargs) for a project ViT of these sizes."""
    dim, depth, heads, patch = (int(backbone["embed_dim"]), int(backbone["depth"]), int(backbone["num_heads"]),
                                int(backbone["patch_size"]))
    size = _square(image_size)
    name = f"vit_{VIT_SIZES.get((dim, depth, heads), 'base')}_patch{patch if patch in (14, 16) else 16}_224"
    kwargs = dict(img_size=size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                  mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), global_pool=global_pool)
    return name, kwargs


def beit_timm_spec(backbone: Mapping[str, Any], image_size: Any, shared_rel_pos_bias: bool,
                   global_pool: str) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) for SimMIM's BEiT-style ViT of these sizes (layer scale 0.1 as
    pretrained; the value is overwritten by the file's ``gamma`` weights)."""
    dim, depth, heads, patch = (int(backbone["embed_dim"]), int(backbone["depth"]), int(backbone["num_heads"]),
                                int(backbone["patch_size"]))
    name = f"beit_{BEIT_SIZES.get((dim, depth, heads), 'base')}_patch16_224"
    kwargs = dict(img_size=_square(image_size), patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                  mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), init_values=0.1, use_abs_pos_emb=False,
                  use_rel_pos_bias=not shared_rel_pos_bias, use_shared_rel_pos_bias=shared_rel_pos_bias,
                  global_pool=global_pool)
    return name, kwargs


def swin_timm_spec(backbone: Mapping[str, Any], image_size: Any, window_size: int) -> tuple[str, dict]:
    dim, depths = int(backbone["embed_dim"]), tuple(int(d) for d in backbone["depths"])
    name = f"swin_{SWIN_SIZES.get((dim, depths), 'base')}_patch4_window7_224"
    kwargs = dict(img_size=_square(image_size), patch_size=int(backbone.get("patch_size", 4)), embed_dim=dim,
                  depths=list(depths), num_heads=[int(h) for h in backbone["num_heads"]], window_size=int(window_size),
                  mlp_ratio=float(backbone.get("mlp_ratio", 4.0)))
    return name, kwargs


def timm_export(state: Mapping[str, torch.Tensor], name: str, kwargs: Mapping[str, Any], family: str,
                method: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A ``format=timm`` export: the timm-keyed tensors and the metadata that rebuilds the model with timm."""
    meta = {"format": "timm", "family": str(family), "method": method, "timm_model": name,
            "timm_kwargs": json.dumps(dict(kwargs))}
    return {k: v.detach().contiguous().clone() for k, v in state.items()}, meta


def own_export(state: Mapping[str, torch.Tensor], builder: str, backbone: Mapping[str, Any], image_size: Any,
               kwargs: Mapping[str, Any], method: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A ``format=mim_lightning`` export: the encoder's own state dict and the builder that rebuilds it
    (``mim_lightning.export.load_exported``)."""
    meta = {"format": "mim_lightning", "family": str(backbone.get("family")), "method": method, "builder": builder,
            "backbone": json.dumps(dict(backbone)), "image_size": json.dumps(image_size),
            "builder_kwargs": json.dumps(dict(kwargs))}
    return {k: v.detach().contiguous().clone() for k, v in state.items()}, meta
