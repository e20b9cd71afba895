"""MAE's method spec: the official-checkpoint converter and the export (a timm ViT)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mim_lightning.errors import ConfigError
from mim_lightning.methods.mae.model import MaskedAutoencoder
from mim_lightning.methods.spec import MethodSpec, register

#: MAE decoder keys (``mae:models_mae.py``) that live under ``decoder.`` in the project's MaskedAutoencoder.
MAE_DECODER_PREFIXES = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                        "decoder_pred.")
MAE_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")

def convert_mae(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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

def export(encoder: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> tuple[dict, dict]:
    """The ViT encoder as timm ``VisionTransformer`` (cls + patch tokens after the final norm)."""
    from mim_lightning.checkpoints.timm_keys import timm_export, vit_timm_spec

    name, kwargs = vit_timm_spec(config["backbone"], config["data"]["image_size"])
    return timm_export(encoder, name, kwargs, "vit", SPEC.target)

SPEC = register(MethodSpec(name="mae", model=MaskedAutoencoder, convert_official=convert_mae, export=export,
                           aliases=("mim_lightning.models.mae.MaskedAutoencoder",)))
