"""iTPN-CLIP's method spec: the official converter (the pyramid keys as iTPN-pixel), the export (the project's HiViT
format with layer scale and relative position tables) and the encoder config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mim_lightning.checkpoints.official import DERIVED_BUFFERS, require_key, route_keys
from mim_lightning.methods.itpn_clip.model import ITPNClip
from mim_lightning.methods.spec import MethodSpec, builder_export, register
from mim_lightning.models.pyramid import ITPN_ENCODER_PREFIXES, ITPN_PYRAMID_PREFIXES

#: iTPN-CLIP's heads (``iTPN:itpn_clip/modeling_pretrain.py iTPNClipDistill``), top-level in ``ITPNClip`` too.
ITPN_CLIP_HEAD_PREFIXES = ("mask_token", "decoder_embed.", "norm.", "norm_cls.", "lm_head.", "lm_cls_head.",
                           "cls_pt_layers.")

def convert_itpn_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``iTPNClipDistill`` keys -> ``ITPNClip`` keys: HiViT (``patch_embed``, ``absolute_pos_embed``, ``blocks``,
    with ``gamma_*`` and relative position tables) under ``encoder.``; the pyramid (as iTPN-pixel) under
    ``pyramid.``; ``mask_token``, ``decoder_embed``, ``norm``, ``lm_head`` and the auxiliary ``cls_pt_layers``,
    ``norm_cls``, ``lm_cls_head`` keep their names. ``relative_position_index`` buffers are dropped; the CLIP
    teacher is not part of the official model (nor of ``ITPNClip``'s state dict)."""
    out = route_keys(state, (("encoder.", ITPN_ENCODER_PREFIXES), ("pyramid.", ITPN_PYRAMID_PREFIXES),
                              ("", ITPN_CLIP_HEAD_PREFIXES)),
                      drop=DERIVED_BUFFERS, method="iTPN-CLIP", source="itpn_clip modeling_pretrain.py")
    for key in ("encoder.absolute_pos_embed", "lm_head.weight", "cls_pt_layers.0.attn.qkv.weight"):
        require_key(out, key, "iTPN-CLIP", "patch_embed, blocks.*, lm_head, cls_pt_layers.*")
    return out

def encoder_config(model: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {"rpe": bool(model.get("rpe", True))}
    if model.get("layer_scale_init", 0.1) is not None:
        config["layer_scale_init"] = float(model.get("layer_scale_init", 0.1))
    return config

#: The encoder's own state dict, rebuilt by ``hivit_from_spec`` as pretrained.
export = builder_export("mim_lightning.models.backbones.hivit.hivit_from_spec", encoder_config)

SPEC = register(MethodSpec(name="itpn_clip", model=ITPNClip, convert_official=convert_itpn_clip, export=export,
                           encoder_config=encoder_config,
                           # the model's class path before the method packages (stored in older checkpoints)
                           aliases=("mim_lightning.models.itpn_clip.ITPNClip",)))
