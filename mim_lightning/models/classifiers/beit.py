"""SimMIM's ViT classifier (``SimMIM:models/vision_transformer.py`` with the finetuning config ``USE_RPB=True,
USE_SHARED_RPB=False, USE_MEAN_POOLING=True``): timm ``Beit``, the same BEiT-style blocks as the SimMIM ViT encoder
(q/v biases, layer scale ``gamma_1/gamma_2``, no absolute position embedding) with a relative position bias table
*per block*, each initialised from the pretraining's shared table (SimMIM's ``load_pretrained``; resized
geometrically, the 3 cls rows kept, when the grid differs), mean of the patch tokens -> ``fc_norm`` (LN 1e-6; the
final ``norm`` is Identity) -> head (std 2e-5 = 0.02 x init_scale 0.001). Layer ids are SimMIM's ``get_vit_layer``
(= MAE's map); weight decay skips only ``pos_embed``/``cls_token`` and 1-D parameters, so the relative position
tables are decayed, as the official ViT finetuning.

The linear probe (``block_avg``) is the pretraining encoder's first ``block`` blocks (shared table, no final norm),
their patch tokens averaged, BN + Linear: the maintainers' "8th layer with average pooling" (SimMIM#14).
Differences from the official code: the shared table is copied to the blocks only when the checkpoint has one (the
official code raises a KeyError otherwise, SimMIM#19), so per-block checkpoints load too; rectangular grids work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.geometry import check_divisible
from mim_lightning.models.classifiers.base import Classifier, ClassifierBuilder, init_head, probe_head
from mim_lightning.models.classifiers.vit import vit_layer_id

#: Rows after the (2h-1)(2w-1) grid offsets in a BEiT-style relative position table: cls-to-token,
#: token-to-cls, cls-to-cls.
BEIT_EXTRA_ROWS = 3


def beit_classifier(backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int,
                    drop_path: float = 0.0, depth: int | None = None, shared_rel_pos_bias: bool = False,
                    global_pool: str = "avg", init_values: float | None = 0.1,
                    use_fc_norm: bool | None = None) -> nn.Module:
    """A timm ``Beit`` shaped like the SimMIM ViT encoder (``SimMIMViTEncoder``): patch conv, cls token, no
    absolute position embedding, blocks with q/v biases and layer scale (``init_values``), LN eps 1e-6.

    ``shared_rel_pos_bias=False`` gives every block its own relative position table (SimMIM finetuning,
    ``USE_RPB=True``); True keeps the pretraining's one shared table. ``global_pool='avg'``: mean of the patch
    tokens -> ``fc_norm`` -> head, the final ``norm`` Identity (``USE_MEAN_POOLING=True``). ``depth`` builds only
    the first blocks (the linear probe on an intermediate block); ``use_fc_norm=False`` drops ``fc_norm`` (and
    keeps ``norm``). ``(B, 3, H, W) -> (B, num_classes)``.
    """
    from timm.models.beit import Beit

    patch = int(backbone["patch_size"])
    size = check_divisible(img_size, patch, "data.image_size", "backbone.patch_size")
    return Beit(img_size=size, patch_size=patch, embed_dim=int(backbone["embed_dim"]),
                depth=int(backbone["depth"]) if depth is None else int(depth), num_heads=int(backbone["num_heads"]),
                mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), qkv_bias=True, num_classes=num_classes,
                global_pool=global_pool, drop_path_rate=float(drop_path), norm_layer=partial(nn.LayerNorm, eps=1e-6),
                init_values=init_values, use_abs_pos_emb=False, use_rel_pos_bias=not shared_rel_pos_bias,
                use_shared_rel_pos_bias=shared_rel_pos_bias, head_init_scale=0.001, use_fc_norm=use_fc_norm)


def _without_mask_token(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k != "mask_token"}


def export_beit(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> tuple[dict, dict]:
    """A finetuned SimMIM ViT without its head, as timm ``Beit`` (per-block tables, ``fc_norm``). The keys are the
    official SimMIM/BEiT names, so the file is also a valid ``pretrained=``."""
    from mim_lightning.checkpoints.timm_keys import beit_timm_spec, timm_export

    if "rel_pos_bias.relative_position_bias_table" in state:
        raise ConfigError("ckpt", "a SimMIM-ViT linear-probe checkpoint", "its pretraining checkpoint (the probe "
                          "does not change the encoder and keeps only the blocks up to the probed one)")
    pool = "avg" if any(k.startswith("fc_norm.") for k in state) else "token"
    name, kwargs = beit_timm_spec(config["backbone"], config["data"]["image_size"], shared_rel_pos_bias=False,
                                  global_pool=pool)
    return timm_export(state, name, kwargs, "vit", "finetune")


class BEiTBuilder(ClassifierBuilder):
    """SimMIM-ViT's classifier (finetuning) or its ``block_avg`` probe; see the module docstring."""

    family = "vit"
    probe_features = ("block_avg",)
    export = staticmethod(export_beit)

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int], drop_path: float = 0.0,
                 head_init_std: float = 2e-5, window_size: None = None) -> None:
        super().__init__(backbone, img_size, drop_path, head_init_std)
        if window_size is not None:
            raise ConfigError("finetune.classifier.window_size", window_size, "null for a ViT",
                              "the ViT classifier attends globally (no windows)")

    def build(self, num_classes: int, probe: Mapping[str, Any] | None = None) -> Classifier:
        from mim_lightning.checkpoints.resize import expand_shared_rel_pos_bias

        self.probe_feature(probe)
        depth = int(self.backbone["depth"])
        if probe is not None:
            block = probe.get("block")
            block = depth if block is None else block
            if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= depth:
                raise ConfigError("finetune.linear_probe.block", probe.get("block"), f"a block number in 1..{depth} "
                                  "(the block whose patch tokens are averaged; SimMIM ViT-B: 8)")
            model = beit_classifier(self.backbone, self.img_size, num_classes, depth=block, shared_rel_pos_bias=True,
                                    use_fc_norm=False)
            model.norm = nn.Identity()  # an intermediate block's tokens, as they are (SimMIM#14)
            init_head(model.head, self.head_std(probe))
            model.head = probe_head(model.embed_dim, model.head)
            unused = ("norm.", *(f"blocks.{i}." for i in range(block, depth)))
            return Classifier(model, model.head, partial(vit_layer_id, num_layers=block + 1), block + 1,
                              grid=tuple(model.patch_embed.grid_size), ignored_unexpected=unused,
                              key_map=_without_mask_token, rel_pos_extra_rows=BEIT_EXTRA_ROWS)
        model = beit_classifier(self.backbone, self.img_size, num_classes, drop_path=self.drop_path)
        init_head(model.head, self.head_init_std)
        # SimMIM:optimizer.py get_vit_layer: cls/mask token, pos_embed, patch_embed 0; blocks.i i + 1; the rest
        # (rel_pos_bias, fc_norm, head) the top: MAE's map with num_layers = depth + 1
        return Classifier(model, model.head, partial(vit_layer_id, num_layers=depth + 1), depth + 1,
                          grid=tuple(model.patch_embed.grid_size), no_weight_decay=("pos_embed", "cls_token"),
                          allowed_missing=("head.", "fc_norm."), ignored_unexpected=("norm.",),
                          key_map=lambda state: expand_shared_rel_pos_bias(_without_mask_token(state), depth),
                          rel_pos_extra_rows=BEIT_EXTRA_ROWS)
