"""MixMAE's method spec: the official (Sense-X/MixMIM) converter, the export (the project's MixMIM encoder format:
timm has no MixMIM) and the encoder config (the per-stage windows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mim_lightning.checkpoints.official import require_key, route_keys
from mim_lightning.methods.mixmae.model import MixMAE
from mim_lightning.methods.spec import MethodSpec, builder_export, register

MIXMIM_ENCODER_PREFIXES = ("patch_embed.", "absolute_pos_embed", "layers.", "norm.")
MIXMIM_DECODER_PREFIXES = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                           "decoder_pred.")

def convert_mixmim(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``MixMIM:models_mixmim.py`` keys -> ``MixMAE`` keys: the encoder's (``patch_embed``, ``absolute_pos_embed``,
    ``layers``, ``norm``) under ``encoder.``, ``mask_token`` and ``decoder_*`` under ``decoder.``. The Swin
    ``relative_position_index`` buffers are kept (the project's MixMIM encoder stores them too); ``attn_mask`` is dropped."""
    out = route_keys(state, (("decoder.", MIXMIM_DECODER_PREFIXES), ("encoder.", MIXMIM_ENCODER_PREFIXES)),
                      drop=("attn_mask",), method="MixMIM", source="models_mixmim.py")
    require_key(out, "encoder.absolute_pos_embed", "MixMIM", "patch_embed, absolute_pos_embed, layers.*")
    return out

def encoder_config(model: Mapping[str, Any]) -> dict[str, Any]:
    from mim_lightning.models.backbones.mixmim import DEFAULT_WINDOWS

    return {"window_size": list(model.get("window_size") or DEFAULT_WINDOWS)}

#: The encoder's own state dict, rebuilt by ``mixmim_from_spec`` as pretrained.
export = builder_export("mim_lightning.models.backbones.mixmim.mixmim_from_spec", encoder_config)

SPEC = register(MethodSpec(name="mixmae", model=MixMAE, convert_official=convert_mixmim, export=export,
                           encoder_config=encoder_config,
                           # the model's class path before the method packages (stored in older checkpoints)
                           aliases=("mixmim", "mim_lightning.models.mixmae.MixMAE")))
