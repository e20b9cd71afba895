"""SimMIM's method spec: the official-checkpoint converter (Swin or BEiT-style ViT, told by the keys), the export
(timm ``SwinTransformer`` or ``Beit``) and the encoder config (the Swin window)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mim_lightning.errors import ConfigError
from mim_lightning.checkpoints.official import DERIVED_BUFFERS, require_key
from mim_lightning.methods.simmim.model import SimMIM
from mim_lightning.methods.spec import MethodSpec, register

#: Key prefixes that tell the two official SimMIM encoder layouts apart (``SimMIM:models/simmim.py``).
SIMMIM_VIT_KEYS = ("encoder.cls_token", "encoder.blocks.", "encoder.rel_pos_bias.")
SIMMIM_SWIN_KEYS = ("encoder.layers.",)

def simmim_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``'vit'`` (``VisionTransformerForSimMIM``: cls token, blocks, shared relative position bias) or ``'swin'``
    (``SwinTransformerForSimMIM``: ``layers``) for an official SimMIM pretraining state dict, told by its keys."""
    vit = any(k.startswith(SIMMIM_VIT_KEYS) for k in state)
    swin = any(k.startswith(SIMMIM_SWIN_KEYS) for k in state)
    if vit == swin:
        raise ConfigError("pretrained", "SimMIM", "an official SimMIM checkpoint with a ViT (encoder.cls_token, "
                          "encoder.blocks.*) or a Swin (encoder.layers.*) encoder",
                          "found " + ("both layouts" if vit else "neither layout")
                          + "; is it a checkpoint of another method?")
    return "vit" if vit else "swin"

def convert_simmim(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``SimMIM:models/simmim.py`` keys (``encoder.*`` and the 1x1-conv ``decoder.0.*``) are the project's
    already: the Swin encoder and the BEiT-style ViT encoder (``SimMIMViTEncoder``) use the official names. The
    layout is detected from the keys (:func:`simmim_layout`). The buffers ``relative_position_index``,
    ``relative_coords_table`` and ``attn_mask`` are dropped (recomputed here).

    The ViT layout must be the official pretraining configuration (``USE_SHARED_RPB=True``, ``USE_APE=False``,
    ``USE_RPB=False``, layer scale): a checkpoint with ``encoder.pos_embed`` or per-block relative position
    tables is a one-line error, since the project's SimMIM ViT has neither."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(DERIVED_BUFFERS):
            continue
        if not key.startswith(("encoder.", "decoder.")):
            raise ConfigError("pretrained", key, "keys of an official SimMIM checkpoint (encoder.*, decoder.0.*)",
                              "unknown key for SimMIM")
        out[key] = value
    require_key(out, "decoder.0.weight", "SimMIM", "encoder.*, decoder.0.*")
    if simmim_layout(out) == "vit":
        unsupported = [k for k in out if k == "encoder.pos_embed" or k.endswith(".attn.relative_position_bias_table")]
        if unsupported:
            raise ConfigError("pretrained", unsupported[0], "an official SimMIM ViT pretrained with the shared "
                              "relative position bias and no absolute position embedding (USE_SHARED_RPB=True, "
                              "USE_APE=False, USE_RPB=False: configs/vit_base__800ep)",
                              "the project's SimMIM ViT has no such weights")
        layout = "ViT encoder.cls_token, encoder.rel_pos_bias.*, encoder.blocks.*"
        for key in ("encoder.cls_token", "encoder.rel_pos_bias.relative_position_bias_table",
                    "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.gamma_1"):
            require_key(out, key, "SimMIM", layout)
    else:
        require_key(out, "encoder.patch_embed.proj.weight", "SimMIM", "Swin encoder.patch_embed.*, encoder.layers.*")
    return out

def export(encoder: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> tuple[dict, dict]:
    """ViT: timm ``Beit`` with the one shared relative position table (``global_pool='token'`` keeps the final
    norm); ``mask_token`` dropped. Swin: timm ``SwinTransformer`` keys (merging one stage up) at the run's window."""
    from mim_lightning.checkpoints.timm_keys import beit_timm_spec, swin_timm_spec, timm_export
    from mim_lightning.models.backbones.swin import swin_to_timm
    from mim_lightning.models.backbones.swin import simmim_window_size

    backbone, image_size = config["backbone"], config["data"]["image_size"]
    if backbone.get("family") == "vit":
        state = {k: v for k, v in encoder.items() if k != "mask_token"}
        name, kwargs = beit_timm_spec(backbone, image_size, shared_rel_pos_bias=True, global_pool="token")
        return timm_export(state, name, kwargs, "vit", SPEC.target)
    window = ((config.get("method") or {}).get("model") or {}).get("window_size")
    window = int(window) if window is not None else simmim_window_size(backbone, image_size)
    name, kwargs = swin_timm_spec(backbone, image_size, window)
    return timm_export(swin_to_timm(encoder), name, kwargs, "swin", SPEC.target)

def encoder_config(model: Mapping[str, Any]) -> dict[str, Any]:
    return {"window_size": model.get("window_size")}

SPEC = register(MethodSpec(name="simmim", model=SimMIM, convert_official=convert_simmim, export=export,
                           encoder_config=encoder_config,
                           # the model's class path before the method packages (stored in older checkpoints)
                           aliases=("mim_lightning.models.simmim.SimMIM",)))
