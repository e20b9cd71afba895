"""The HiViT classifier (iTPN finetuning, ``itpn_base`` with ``num_outs=1``): HiViT with relative-position tables
(zeros at init: not in pixel checkpoints; iTPN-CLIP checkpoints have them), mean over the unit tokens, ``fc_norm``,
head. The layer decay is rescaled to ``decay ** (13 / num_layers)`` as iTPN does. ``layer_scale_init`` (iTPN-CLIP:
0.1) adds the ``gamma`` weights the CLIP encoder was pretrained with (``--layer_scale_init_value``). The main stage
adds the stored ``absolute_pos_embed`` (all units present, as the official finetuning). A missing layer scale is a
one-line error where the official loader skips it silently (iTPN#17)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from mim_lightning.models.classifiers.base import Classifier, ClassifierBuilder, init_head, probe_head


class HiViTClassifier(nn.Module):
    """iTPN's finetuning model: HiViT -> mean over the unit tokens -> ``fc_norm`` (LN 1e-6) -> ``head``.
    ``(B, 3, H, W) -> (B, classes)``."""

    def __init__(self, encoder: nn.Module, num_classes: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_features = int(encoder.embed_dim)
        self.fc_norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc_norm(self.encoder(images).mean(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


def hivit_layer_id(name: str, merge_blocks: Sequence[int], num_layers: int) -> int:
    """iTPN's layer ids (``itpn_pixel/util/lr_decay.py``, ``encoder.`` prefix removed): ``patch_embed``,
    ``absolute_pos_embed`` and ``cls_token`` are 0; ``blocks.i`` is the number of non-PatchMerge blocks among
    ``blocks[0..i]`` (a PatchMerge takes the id of the block before it); the rest ``num_layers``
    (``num_layers`` = non-PatchMerge blocks + 1)."""
    name = name[len("encoder."):] if name.startswith("encoder.") else name
    if name.startswith(("patch_embed", "absolute_pos_embed", "cls_token")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        index = int(match.group(1))
        return index + 1 - sum(1 for merge in merge_blocks if merge <= index)
    return num_layers


class HiViTBuilder(ClassifierBuilder):
    """iTPN's classifier (pixel and CLIP). No decay for ``absolute_pos_embed`` (``models_itpn.py``
    ``no_weight_decay()``) and, by name, the relative position tables (``param_groups_lrd``)."""

    family = "hivit"
    probe_features = ("avg",)

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int], drop_path: float = 0.0,
                 head_init_std: float = 2e-5, layer_scale_init: float | None = None) -> None:
        super().__init__(backbone, img_size, drop_path, head_init_std)
        self.layer_scale_init = None if layer_scale_init is None else float(layer_scale_init)

    def build(self, num_classes: int, probe: Mapping[str, Any] | None = None) -> Classifier:
        from mim_lightning.models.backbones.hivit import PatchMerge, hivit_from_spec

        self.probe_feature(probe)
        encoder = hivit_from_spec(self.backbone, self.img_size, rpe=True,
                                  drop_path_rate=0.0 if probe is not None else self.drop_path,
                                  layer_scale_init=self.layer_scale_init)
        model = HiViTClassifier(encoder, num_classes)
        init_head(model.head, self.head_std(probe))
        if probe is not None:
            model.head = probe_head(model.num_features, model.head)
        merges = [i for i, block in enumerate(encoder.blocks) if isinstance(block, PatchMerge)]
        num_layers = len(encoder.blocks) - len(merges) + 1
        return Classifier(model, model.head, partial(hivit_layer_id, merge_blocks=merges, num_layers=num_layers),
                          num_layers, grid=encoder.grid, allowed_missing=("head.", "fc_norm."),
                          allowed_missing_suffixes=("relative_position_bias_table",),  # not in pixel checkpoints
                          no_weight_decay_keys=("absolute_pos_embed", "relative_position_bias_table"),
                          key_map=lambda state: {"encoder." + k: v for k, v in state.items()},
                          # iTPN normalizes the decay to a 12-block ViT-B depth: decay ** (13 / num_layers)
                          decay_power=13.0 / num_layers)
