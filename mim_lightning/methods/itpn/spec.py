"""iTPN-pixel's method spec: the official converter, the export (the project's HiViT format: timm has no HiViT)
and the encoder config (relative position bias on or off)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mim_lightning.checkpoints.official import DERIVED_BUFFERS, require_key, route_keys
from mim_lightning.methods.itpn.model import ITPNPixel
from mim_lightning.models.pyramid import ITPN_ENCODER_PREFIXES, ITPN_PYRAMID_PREFIXES
from mim_lightning.methods.spec import MethodSpec, builder_export, register

ITPN_DECODER_PREFIXES = ("mask_token", "decoder_")

def convert_itpn(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``iTPN:itpn_pixel/models/models_itpn_mim.py`` keys -> ``ITPNPixel`` keys: HiViT (``patch_embed``,
    ``absolute_pos_embed``, ``blocks``) under ``encoder.``; ``align_dim_*``, ``split_*``, ``block_16to8``,
    ``block_8to4``, ``fpn_modules`` under ``pyramid.``; ``decoder_*`` and ``mask_token`` under ``decoder.``;
    ``relative_position_index`` buffers dropped."""
    out = route_keys(state, (("encoder.", ITPN_ENCODER_PREFIXES), ("pyramid.", ITPN_PYRAMID_PREFIXES),
                              ("decoder.", ITPN_DECODER_PREFIXES)),
                      drop=DERIVED_BUFFERS, method="iTPN", source="iTPN-pixel models_itpn_mim.py")
    require_key(out, "encoder.absolute_pos_embed", "iTPN", "patch_embed, absolute_pos_embed, blocks.*")
    return out

def encoder_config(model: Mapping[str, Any]) -> dict[str, Any]:
    return {"rpe": bool(model.get("rpe", False))}

#: The encoder's own state dict, rebuilt by ``hivit_from_spec`` as pretrained.
export = builder_export("mim_lightning.models.backbones.hivit.hivit_from_spec", encoder_config)

SPEC = register(MethodSpec(name="itpn", model=ITPNPixel, convert_official=convert_itpn, export=export,
                           encoder_config=encoder_config,
                           # the model's class path before the method packages (stored in older checkpoints)
                           aliases=("mim_lightning.models.itpn.ITPNPixel",)))
