"""The MixMIM classifier (MixMAE finetuning, ``MixMIM:models_mixmim.py`` with ``num_classes``): the project's W14
encoder without mixing, mean over the final-norm tokens, head; layer ids as ``MixMIM:util/lr_decay.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from mim_lightning.models.classifiers.base import Classifier, ClassifierBuilder, init_head, probe_head
from mim_lightning.models.classifiers.swin import stage_place


class MixMIMClassifier(nn.Module):
    """MixMIM's finetuning model: the W14 encoder without mixing (``encoder(images)``, final norm) -> mean over the
    tokens -> ``head``. ``(B, 3, H, W) -> (B, classes)``."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_features = int(encoder.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


def mixmim_layer_id(name: str, depths: Sequence[int]) -> int:
    """MixMIM's ``get_layer_id`` (``MixMIM:util/lr_decay.py``, ``encoder.`` prefix removed): ``patch_embed`` and
    ``absolute_pos_embed`` are 0, ``layers.s.blocks.j`` is ``sum(depths[:s]) + j + 1``, ``layers.s.downsample``
    is ``sum(depths[:s + 1]) + 1``, and everything else (final norm, head) ``sum(depths)``: with
    ``num_layers = sum(depths) + 1`` the head trains at ``layer_decay ** 1``, as the official code (not 1 as MAE)."""
    name = name[len("encoder."):] if name.startswith("encoder.") else name
    if name.startswith(("patch_embed", "absolute_pos_embed")):
        return 0
    place = stage_place(name)
    if place is None:
        return sum(depths)
    stage, block = place
    return sum(depths[:stage]) + block + 1 if block is not None else sum(depths[: stage + 1]) + 1


class MixMIMBuilder(ClassifierBuilder):
    """MixMAE's classifier; ``window_size`` null: the official ``[14, 14, 14, 7]`` (clamped per stage). Weight decay
    as ``models_mixmim_ft.py``, whose ``no_weight_decay()`` is empty: the 2-D relative position tables are decayed
    (the fixed sin-cos ``absolute_pos_embed`` is not trained). Tables of another window are resized bicubically,
    as MixMIM does."""

    family = "swin"
    probe_features = ("avg",)

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int], drop_path: float = 0.0,
                 head_init_std: float = 2e-5, window_size: Sequence[int] | None = None) -> None:
        super().__init__(backbone, img_size, drop_path, head_init_std)
        self.window_size = window_size

    def build(self, num_classes: int, probe: Mapping[str, Any] | None = None) -> Classifier:
        from mim_lightning.models.backbones.mixmim import DEFAULT_WINDOWS, mixmim_from_spec

        self.probe_feature(probe)
        windows = list(DEFAULT_WINDOWS if self.window_size is None else self.window_size)
        encoder = mixmim_from_spec(self.backbone, self.img_size, window_size=windows,
                                   drop_path_rate=0.0 if probe is not None else self.drop_path)
        model = MixMIMClassifier(encoder, num_classes)
        init_head(model.head, self.head_std(probe))
        if probe is not None:
            model.head = probe_head(model.num_features, model.head)
        depths = [int(d) for d in self.backbone["depths"]]
        return Classifier(model, model.head, partial(mixmim_layer_id, depths=depths), sum(depths) + 1,
                          grid=encoder.grid, rel_pos_mode="bicubic",
                          key_map=lambda state: {"encoder." + k: v for k, v in state.items()
                                                 if not k.endswith("attn_mask")})
