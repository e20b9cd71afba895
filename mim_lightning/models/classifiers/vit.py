"""The ViT classifier (MAE finetuning, ``mae:models_vit.py``): timm ``VisionTransformer``.

``pool='avg'`` (``global_pool=True``): mean of the patch tokens (cls excluded) -> ``fc_norm`` (LN, eps 1e-6) ->
head; timm then has no final ``norm`` (Identity), exactly as MAE deletes it. ``pool='token'``: ``norm(x)[:, 0]`` ->
head (MAE ``--cls_token``; the linear-probe feature ``cls``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from mim_lightning.geometry import check_divisible
from mim_lightning.models.classifiers.base import Classifier, ClassifierBuilder, init_head, probe_head

POOLS = ("avg", "token")


def vit_classifier(backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int, pool: str = "avg",
                   drop_path: float = 0.0) -> nn.Module:
    """A timm ``VisionTransformer`` with the backbone's sizes (LN eps 1e-6, qkv bias, cls token).

    ``pool='avg'``: MAE's global pool + ``fc_norm``; ``pool='token'``: the cls token after ``norm``.
    """
    from timm.models.vision_transformer import VisionTransformer

    size = check_divisible(img_size, int(backbone["patch_size"]), "data.image_size", "backbone.patch_size")
    return VisionTransformer(img_size=size, patch_size=int(backbone["patch_size"]), embed_dim=int(backbone["embed_dim"]),
                             depth=int(backbone["depth"]), num_heads=int(backbone["num_heads"]),
                             mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), qkv_bias=True, num_classes=num_classes,
                             global_pool=pool, drop_path_rate=float(drop_path))


def vit_layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit`` (``mae:util/lr_decay.py``): ``cls_token``, ``pos_embed`` and
    ``patch_embed.*`` are layer 0, ``blocks.i.*`` layer ``i + 1``, everything else (norms, head) ``num_layers``
    (``num_layers = depth + 1``)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return num_layers


def export_vit(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> tuple[dict, dict]:
    """A finetuned ViT without its head, as timm ``VisionTransformer`` (``global_pool`` as it was trained)."""
    from mim_lightning.checkpoints.timm_keys import timm_export, vit_timm_spec

    pool = "avg" if any(k.startswith("fc_norm.") for k in state) else "token"
    name, kwargs = vit_timm_spec(config["backbone"], config["data"]["image_size"], pool)
    return timm_export(state, name, kwargs, "vit", "finetune")


class ViTBuilder(ClassifierBuilder):
    """MAE's classifier; probe features ``cls`` (the cls token after the final norm, MAE's probe) and ``avg``
    (``fc_norm`` of the mean patch token at its init, MAE's ``--global_pool`` probe)."""

    family = "vit"
    probe_features = ("cls", "avg")
    export = staticmethod(export_vit)

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int], drop_path: float = 0.0,
                 head_init_std: float = 2e-5, pool: str = "avg") -> None:
        super().__init__(backbone, img_size, drop_path, head_init_std)
        if pool not in POOLS:
            from mim_lightning.errors import ConfigError

            raise ConfigError("finetune.classifier.pool", pool, ", ".join(POOLS))
        self.pool = pool

    def build(self, num_classes: int, probe: Mapping[str, Any] | None = None) -> Classifier:
        feature = self.probe_feature(probe)
        pool = self.pool if probe is None else ("avg" if feature == "avg" else "token")
        model = vit_classifier(self.backbone, self.img_size, num_classes, pool=pool,
                               drop_path=0.0 if probe is not None else self.drop_path)
        init_head(model.head, self.head_std(probe))
        if probe is not None:
            model.head = probe_head(model.embed_dim, model.head)
        depth = int(self.backbone["depth"])
        return Classifier(model, model.head, partial(vit_layer_id, num_layers=depth + 1), depth + 1,
                          grid=tuple(model.patch_embed.grid_size), no_weight_decay=("pos_embed", "cls_token", "dist_token"),
                          allowed_missing=("head.", "fc_norm.") if pool == "avg" else ("head.",),
                          ignored_unexpected=("norm.",) if pool == "avg" else ())
