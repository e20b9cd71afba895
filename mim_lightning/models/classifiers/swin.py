"""The Swin classifier (SimMIM finetuning): timm ``SwinTransformer`` (window 7 at 224px by default), average pool
after the final norm, ``head.fc``. SimMIM's encoder keys are moved to timm's names (patch merging one stage up) and
the relative-position-bias tables resized to the new window (SimMIM's geometric resampling, centre kept; SciPy's
``RectBivariateSpline`` instead of the removed ``interp2d``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from torch import nn

from mim_lightning.geometry import check_divisible
from mim_lightning.models.classifiers.base import Classifier, ClassifierBuilder, init_head, probe_head


def swin_classifier(backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int, window_size: int,
                    drop_path: float = 0.0) -> nn.Module:
    """A timm ``SwinTransformer`` (V1) with the backbone's sizes: average pool over the final-norm tokens, then
    ``head.fc`` (the official Swin / SimMIM finetuning classifier; LN eps 1e-5, no absolute position embedding)."""
    from timm.models.swin_transformer import SwinTransformer

    from mim_lightning.models.backbones.swin import stage_windows

    depths = [int(d) for d in backbone["depths"]]
    patch = int(backbone.get("patch_size", 4))
    size = check_divisible(img_size, patch * 2 ** (len(depths) - 1), "data.image_size", "the encoder stride")
    stage_windows((size[0] // patch, size[1] // patch), len(depths), int(window_size), patch)  # one-line error
    return SwinTransformer(img_size=size, patch_size=patch, embed_dim=int(backbone["embed_dim"]), depths=depths,
                           num_heads=[int(h) for h in backbone["num_heads"]], window_size=int(window_size),
                           mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), num_classes=num_classes,
                           global_pool="avg", drop_path_rate=float(drop_path))


def stage_place(name: str) -> tuple[int, int | None] | None:
    """``(stage, block)`` of a ``layers.{stage}.blocks.{block}.*`` parameter, ``(stage, None)`` of a
    ``layers.{stage}.downsample.*`` one, None for the rest (stem, final norm, head)."""
    match = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)\.", name)
    if match is None:
        return None
    return int(match.group(1)), None if match.group(3) is None else int(match.group(3))


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """SimMIM's ``get_swin_layer_id`` (``SimMIM:optimizer.py``) on timm's names: ``patch_embed``,
    ``absolute_pos_embed`` and ``mask_token`` are 0, ``layers.i.blocks.j`` is ``sum(depths[:i]) + j + 1``, the
    patch merging (official ``layers.{i-1}.downsample``, timm ``layers.i.downsample``) is ``sum(depths[:i])``,
    the rest (final norm, head) ``sum(depths) + 1`` (scale 1, as SimMIM's ``num_layers - 1``)."""
    if name.startswith(("patch_embed", "absolute_pos_embed", "mask_token")):
        return 0
    place = stage_place(name)
    if place is None:
        return sum(depths) + 1
    stage, block = place
    return sum(depths[:stage]) + block + 1 if block is not None else sum(depths[:stage])


class SwinBuilder(ClassifierBuilder):
    """SimMIM-Swin's classifier; ``window_size`` null: the backbone's SimMIM window scaled with the image size.
    No decay for ``absolute_pos_embed`` and the relative position tables (Swin's ``no_weight_decay()`` and
    ``no_weight_decay_keywords()``, as SimMIM's finetuning)."""

    family = "swin"
    probe_features = ("avg",)

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int], drop_path: float = 0.0,
                 head_init_std: float = 0.02, window_size: int | None = None) -> None:
        super().__init__(backbone, img_size, drop_path, head_init_std)
        self.window_size = window_size

    def build(self, num_classes: int, probe: Mapping[str, Any] | None = None) -> Classifier:
        from mim_lightning.models.backbones.swin import swin_to_timm
        from mim_lightning.models.backbones.swin import simmim_window_size

        self.probe_feature(probe)
        window = (int(self.window_size) if self.window_size is not None
                  else simmim_window_size(self.backbone, self.img_size))
        model = swin_classifier(self.backbone, self.img_size, num_classes, window,
                                drop_path=0.0 if probe is not None else self.drop_path)
        init_head(model.head.fc, self.head_std(probe))
        if probe is not None:
            model.head.fc = probe_head(model.num_features, model.head.fc)
        depths = [int(d) for d in self.backbone["depths"]]
        return Classifier(model, model.head, partial(swin_layer_id, depths=depths), sum(depths) + 1,
                          grid=tuple(model.patch_embed.grid_size), key_map=swin_to_timm,
                          no_weight_decay_keys=("absolute_pos_embed", "relative_position_bias_table"))
