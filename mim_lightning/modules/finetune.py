"""Finetuning and linear probing of a pretrained encoder: classifiers, weight loading, the LightningModule.

``build_finetune_module(cfg)`` turns a composed ``conf/finetune.yaml`` into a :class:`FinetuneModule`:
it builds the method's classifier (``cfg.finetune.classifier``), loads ``cfg.pretrained`` into it and sets
the optimizer recipe of ``cfg.mode`` (``finetune`` or ``linear_probe``).

Classifiers (plain ``nn.Module``, timm models where timm has one):

- ``vit_avg`` (MAE finetuning, ``mae:models_vit.py`` with ``global_pool=True``): timm ``VisionTransformer``
  with ``global_pool='avg'``: mean of the patch tokens (cls excluded) -> ``fc_norm`` (LN, eps 1e-6) -> head.
  timm then has no final ``norm`` (Identity), exactly as MAE deletes it.
- ``vit_cls``: ``norm(x)[:, 0]`` -> head (MAE ``--cls_token``; the linear-probe feature).
- ``swin_avg`` (SimMIM): timm ``SwinTransformer`` (window 7 at 224px by default), average pool after the final
  norm, ``head.fc``. SimMIM's encoder keys are moved to timm's names (patch merging one stage up) and the
  relative-position-bias tables resized to the new window (SimMIM's geometric resampling, centre kept).
- ``mixmim_avg`` (MixMAE): the project's MixMIM W14 encoder without mixing, mean over tokens, head; the head is at
  ``layer_decay ** 1`` as the official layer-id map gives it.
- ``beit_avg`` (SimMIM with a ViT, ``SimMIM:models/vision_transformer.py`` with the finetuning config
  ``USE_RPB=True, USE_SHARED_RPB=False, USE_MEAN_POOLING=True``): timm ``Beit`` (the same BEiT-style blocks as
  the SimMIM ViT encoder: q/v biases, layer scale ``gamma_1/gamma_2``, no absolute position embedding) with a
  relative position bias table *per block*, each initialised from the pretraining's shared table (SimMIM's
  ``load_pretrained``; resized geometrically, the 3 cls rows kept, when the grid differs), mean of the patch
  tokens -> ``fc_norm`` (LN 1e-6; the final ``norm`` is Identity) -> head (std 2e-5 = 0.02 x init_scale 0.001).
  Layer ids are SimMIM's ``get_vit_layer`` (= MAE's map); weight decay skips only ``pos_embed``/``cls_token`` and
  1-D parameters, so the relative position tables are decayed, as the official ViT finetuning.
- ``hivit_avg`` (iTPN): HiViT with relative-position tables (zeros at init: not in pixel checkpoints; iTPN-CLIP
  checkpoints have them), mean over unit tokens, ``fc_norm``, head; the layer decay is rescaled to
  ``decay ** (13 / num_layers)`` as iTPN does. ``layer_scale_init`` (iTPN-CLIP: 0.1) adds the ``gamma`` weights the
  CLIP encoder was pretrained with (``run_itpn_finetuning.py --layer_scale_init_value``). The main stage adds the
  stored ``absolute_pos_embed`` (all units present, as the official finetuning): an iTPN-pixel encoder pretrained
  with ``official_pos_resample`` (official checkpoints too) saw a bicubically resampled copy of it instead.

Linear probing (``mode=linear_probe``) puts ``BatchNorm1d(D, affine=False, eps=1e-6)`` before the linear head
and freezes everything else (``mae:main_linprobe.py``). The feature (``finetune.linear_probe.feature``): ``cls``
(MAE: the cls token after the final norm); ``avg`` (the recipe's classifier with average-pooled final tokens:
Swin, MixMIM, HiViT, none of which has official probe code); ``block_avg`` (SimMIM ViT: the patch tokens of block
``finetune.linear_probe.block`` averaged, no norm: the maintainers' "8th layer with average pooling", SimMIM#14;
the blocks after it are not built).

Differences from the official code: the MixMIM/HiViT position embeddings are resized bicubically for another
image size (iTPN's ``interpolate_pos_embed`` is a no-op there); the Swin and SimMIM-ViT rel-pos resampling uses
SciPy's ``RectBivariateSpline`` instead of the removed ``interp2d`` (and handles rectangular grids, which the
official ViT code rejects); SimMIM-ViT's shared table is copied to the blocks only when the checkpoint has one
(the official code raises a KeyError otherwise, SimMIM#19), so per-block checkpoints load too; a missing layer
scale (``gamma``) or relative position table that the classifier expects is a one-line error where the official
loaders skip it silently (iTPN#17), except HiViT's tables (absent from pixel checkpoints: zeros, as official);
EMA of weights is Lightning's ``EMAWeightAveraging``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch import nn

from mim_lightning import runlog
from mim_lightning.errors import ConfigError
from mim_lightning.optim import layer_decay_param_groups, make_optimizer, scaled_lr, unwrapped_name, warmup_cosine_factor

MODES = ("finetune", "linear_probe")
CLASSIFIERS = ("vit_avg", "vit_cls", "beit_avg", "swin_avg", "mixmim_avg", "hivit_avg")
PROBE_FEATURES = ("cls", "avg", "block_avg")
#: The backbone family each classifier kind is built from (the kind's prefix otherwise).
CLASSIFIER_FAMILY = {"mixmim": "swin", "beit": "vit"}

DEFAULT_LR = {"base": 5e-4, "base_batch_size": 256, "value": None, "min": 1e-6, "warmup_epochs": 5.0,
              "warmup_steps": None, "warmup_start": 0.0, "scale_min_and_warmup": False, "cosine_from": "warmup_end"}


# --------------------------------------------------------------------------- classifiers and layer ids


def vit_classifier(backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int, pool: str = "avg",
                   drop_path: float = 0.0) -> nn.Module:
    """A timm ``VisionTransformer`` with the backbone's sizes (LN eps 1e-6, qkv bias, cls token).

    ``pool='avg'``: MAE's global pool + ``fc_norm``; ``pool='token'``: the cls token after ``norm``.
    """
    from timm.models.vision_transformer import VisionTransformer

    from mim_lightning.geometry import check_divisible

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

    from mim_lightning.geometry import check_divisible

    patch = int(backbone["patch_size"])
    size = check_divisible(img_size, patch, "data.image_size", "backbone.patch_size")
    return Beit(img_size=size, patch_size=patch, embed_dim=int(backbone["embed_dim"]),
                depth=int(backbone["depth"]) if depth is None else int(depth), num_heads=int(backbone["num_heads"]),
                mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), qkv_bias=True, num_classes=num_classes,
                global_pool=global_pool, drop_path_rate=float(drop_path), norm_layer=partial(nn.LayerNorm, eps=1e-6),
                init_values=init_values, use_abs_pos_emb=False, use_rel_pos_bias=not shared_rel_pos_bias,
                use_shared_rel_pos_bias=shared_rel_pos_bias, head_init_scale=0.001, use_fc_norm=use_fc_norm)


def swin_classifier(backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int, window_size: int,
                    drop_path: float = 0.0) -> nn.Module:
    """A timm ``SwinTransformer`` (V1) with the backbone's sizes: average pool over the final-norm tokens, then
    ``head.fc`` (the official Swin / SimMIM finetuning classifier; LN eps 1e-5, no absolute position embedding)."""
    from timm.models.swin_transformer import SwinTransformer

    from mim_lightning.models.backbones.swin import stage_windows

    depths = [int(d) for d in backbone["depths"]]
    patch = int(backbone.get("patch_size", 4))
    size = check_size(img_size, patch * 2 ** (len(depths) - 1))
    stage_windows((size[0] // patch, size[1] // patch), len(depths), int(window_size), patch)  # one-line error
    return SwinTransformer(img_size=size, patch_size=patch, embed_dim=int(backbone["embed_dim"]), depths=depths,
                           num_heads=[int(h) for h in backbone["num_heads"]], window_size=int(window_size),
                           mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), num_classes=num_classes,
                           global_pool="avg", drop_path_rate=float(drop_path))


def check_size(img_size: int | Sequence[int], stride: int) -> tuple[int, int]:
    from mim_lightning.geometry import check_divisible

    return check_divisible(img_size, stride, "data.image_size", "the encoder stride")


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """SimMIM's ``get_swin_layer_id`` (``SimMIM:optimizer.py``) on timm's names: ``patch_embed``,
    ``absolute_pos_embed`` and ``mask_token`` are 0, ``layers.i.blocks.j`` is ``sum(depths[:i]) + j + 1``, the
    patch merging (official ``layers.{i-1}.downsample``, timm ``layers.i.downsample``) is ``sum(depths[:i])``,
    the rest (final norm, head) ``sum(depths) + 1`` (scale 1, as SimMIM's ``num_layers - 1``)."""
    if name.startswith(("patch_embed", "absolute_pos_embed", "mask_token")):
        return 0
    match = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)\.", name)
    if match:
        stage = int(match.group(1))
        if match.group(3) is not None:
            return sum(depths[:stage]) + int(match.group(3)) + 1
        return sum(depths[:stage])
    return sum(depths) + 1


class MixMIMClassifier(nn.Module):
    """MixMIM's finetuning model (``MixMIM:models_mixmim.py`` with ``num_classes``): the W14 encoder without
    mixing (``encoder(images)``, final norm) -> mean over the tokens -> ``head``. ``(B, 3, H, W) -> (B, classes)``."""

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
    match = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)\.", name)
    if match:
        stage = int(match.group(1))
        if match.group(3) is not None:
            return sum(depths[:stage]) + int(match.group(3)) + 1
        return sum(depths[: stage + 1]) + 1
    return sum(depths)


class HiViTClassifier(nn.Module):
    """iTPN's finetuning model (``itpn_base``, ``num_outs=1``): HiViT with relative position bias tables (zeros at
    init, they are not in pixel pretraining checkpoints) -> mean over the unit tokens -> ``fc_norm`` (LN 1e-6) ->
    ``head``. ``(B, 3, H, W) -> (B, classes)``."""

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


class Classifier:
    """What the finetuning module needs to know about a classifier: the model, its head, its layer-id map."""

    def __init__(self, model: nn.Module, head: nn.Module, layer_id: Callable[[str], int], num_layers: int,
                 no_weight_decay: Sequence[str], allowed_missing: Sequence[str], ignored_unexpected: Sequence[str],
                 grid: tuple[int, int]) -> None:
        self.model = model
        self.head = head
        self.layer_id = layer_id
        self.num_layers = num_layers
        self.no_weight_decay = tuple(no_weight_decay)
        self.allowed_missing = tuple(allowed_missing)
        self.ignored_unexpected = tuple(ignored_unexpected)
        self.grid = grid


def build_classifier(kind: str, backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int,
                     mode: str, drop_path: float = 0.0, head_init_std: float = 2e-5,
                     window_size: int | None = None, probe_feature: str | None = None, probe_block: int | None = None,
                     layer_scale_init: float | None = None) -> Classifier:
    """The classifier ``kind`` (see :data:`CLASSIFIERS`) for ``mode``; the head is initialized with
    ``trunc_normal_(std=head_init_std)`` and zero bias as the official code does after loading.

    ``probe_feature`` (``mode=linear_probe``, see :data:`PROBE_FEATURES`): ``cls`` turns a ViT classifier into
    ``vit_cls`` (also the ViT default); ``block_avg`` (``beit_avg`` only) probes the average-pooled output of block
    ``probe_block`` (1-based); ``avg`` the average-pooled final tokens (ViT: through ``fc_norm`` at its init, as
    MAE's ``--global_pool`` probe). ``layer_scale_init`` is HiViT's ``gamma`` init (iTPN-CLIP)."""
    from timm.layers import trunc_normal_

    if kind not in CLASSIFIERS:
        raise ConfigError("finetune.classifier", kind, ", ".join(CLASSIFIERS))
    family = backbone.get("family")
    needed = CLASSIFIER_FAMILY.get(kind.split("_")[0], kind.split("_")[0])
    if family != needed:
        raise ConfigError("backbone", backbone.get("name", family), f"{needed}_* backbones for the {kind} classifier",
                          f"the '{family}' family does not fit this method's finetuning classifier")
    probe = mode == "linear_probe"
    if probe and probe_feature is not None:
        supported = {"beit_avg": ("block_avg",)}.get(kind, ("cls", "avg") if family == "vit" else ("avg",))
        if probe_feature not in supported:
            raise ConfigError("finetune.linear_probe.feature", probe_feature, ", ".join(supported),
                              f"the {kind} classifier has no '{probe_feature}' probe feature")
        if probe_feature == "cls":
            kind = "vit_cls"
    if kind == "beit_avg":
        return _beit(backbone, img_size, num_classes, probe, drop_path, head_init_std, probe_block)
    if kind == "swin_avg":
        return _swin(backbone, img_size, num_classes, probe, drop_path, head_init_std, window_size)
    if kind == "mixmim_avg":
        return _mixmim(backbone, img_size, num_classes, probe, drop_path, head_init_std, window_size)
    if kind == "hivit_avg":
        return _hivit(backbone, img_size, num_classes, probe, drop_path, head_init_std, layer_scale_init)
    # a ViT probe reads the cls token unless the feature is avg (MAE main_linprobe.py --global_pool: fc_norm at init)
    pool = "token" if kind == "vit_cls" or (probe and probe_feature != "avg") else "avg"
    model = vit_classifier(backbone, img_size, num_classes, pool=pool, drop_path=0.0 if probe else drop_path)
    trunc_normal_(model.head.weight, std=head_init_std)
    nn.init.zeros_(model.head.bias)
    if probe:
        model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), model.head)
    depth = int(backbone["depth"])
    allowed_missing = ("head.", "fc_norm.") if pool == "avg" else ("head.",)
    ignored = ("norm.",) if pool == "avg" else ()
    grid = tuple(model.patch_embed.grid_size)
    return Classifier(model, model.head, partial(vit_layer_id, num_layers=depth + 1), depth + 1,
                      no_weight_decay=("pos_embed", "cls_token", "dist_token"), allowed_missing=allowed_missing,
                      ignored_unexpected=ignored, grid=grid)


def _beit(backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int, probe: bool,
          drop_path: float, head_init_std: float, probe_block: int | None) -> Classifier:
    """SimMIM-ViT finetuning (per-block relative position tables from the shared one) or, for the probe, the
    pretraining encoder's first ``probe_block`` blocks (shared table, no final norm) + BN + Linear."""
    from timm.layers import trunc_normal_

    from mim_lightning.checkpoints import expand_shared_rel_pos_bias

    depth = int(backbone["depth"])
    if probe:
        block = depth if probe_block is None else probe_block
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= depth:
            raise ConfigError("finetune.linear_probe.block", probe_block, f"a block number in 1..{depth} (the block "
                              "whose patch tokens are averaged; SimMIM ViT-B: 8)")
        model = beit_classifier(backbone, img_size, num_classes, depth=block, shared_rel_pos_bias=True,
                                use_fc_norm=False)
        model.norm = nn.Identity()  # an intermediate block's tokens, as they are (SimMIM#14)
        trunc_normal_(model.head.weight, std=head_init_std)
        nn.init.zeros_(model.head.bias)
        model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), model.head)
        unused = ("norm.", *(f"blocks.{i}." for i in range(block, depth)))
        classifier = Classifier(model, model.head, partial(vit_layer_id, num_layers=block + 1), block + 1,
                                no_weight_decay=(), allowed_missing=("head.",), ignored_unexpected=unused,
                                grid=tuple(model.patch_embed.grid_size))
        classifier.key_map = lambda state: {k: v for k, v in state.items() if k != "mask_token"}
    else:
        model = beit_classifier(backbone, img_size, num_classes, drop_path=drop_path)
        trunc_normal_(model.head.weight, std=head_init_std)
        nn.init.zeros_(model.head.bias)
        # SimMIM:optimizer.py get_vit_layer: cls/mask token, pos_embed, patch_embed 0; blocks.i i + 1; the rest
        # (rel_pos_bias, fc_norm, head) the top: MAE's map with num_layers = depth + 1
        classifier = Classifier(model, model.head, partial(vit_layer_id, num_layers=depth + 1), depth + 1,
                                no_weight_decay=("pos_embed", "cls_token"), allowed_missing=("head.", "fc_norm."),
                                ignored_unexpected=("norm.",), grid=tuple(model.patch_embed.grid_size))
        classifier.key_map = lambda state: expand_shared_rel_pos_bias(
            {k: v for k, v in state.items() if k != "mask_token"}, depth)
    classifier.rel_pos_extra_rows = BEIT_EXTRA_ROWS
    return classifier


def _swin(backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int, probe: bool, drop_path: float,
          head_init_std: float, window_size: int | None) -> Classifier:
    from timm.layers import trunc_normal_

    from mim_lightning.export import swin_to_timm
    from mim_lightning.models.backbones.swin import simmim_window_size

    window = int(window_size) if window_size is not None else simmim_window_size(backbone, img_size)
    model = swin_classifier(backbone, img_size, num_classes, window, drop_path=0.0 if probe else drop_path)
    trunc_normal_(model.head.fc.weight, std=head_init_std)
    nn.init.zeros_(model.head.fc.bias)
    if probe:
        model.head.fc = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6), model.head.fc)
    depths = [int(d) for d in backbone["depths"]]
    classifier = Classifier(model, model.head, partial(swin_layer_id, depths=depths), sum(depths) + 1,
                            no_weight_decay=(), allowed_missing=("head.",), ignored_unexpected=(),
                            grid=tuple(model.patch_embed.grid_size))
    classifier.key_map = swin_to_timm
    classifier.no_weight_decay_keys = ("absolute_pos_embed", "relative_position_bias_table")
    return classifier


def _mixmim(backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int, probe: bool,
            drop_path: float, head_init_std: float, window_size: Any) -> Classifier:
    from timm.layers import trunc_normal_

    from mim_lightning.models.backbones.mixmim import DEFAULT_WINDOWS, mixmim_from_spec

    windows = list(DEFAULT_WINDOWS if window_size is None else window_size)
    encoder = mixmim_from_spec(dict(backbone), img_size, window_size=windows, drop_path_rate=0.0 if probe else drop_path)
    model = MixMIMClassifier(encoder, num_classes)
    trunc_normal_(model.head.weight, std=head_init_std)
    nn.init.zeros_(model.head.bias)
    if probe:
        model.head = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6), model.head)
    depths = [int(d) for d in backbone["depths"]]
    classifier = Classifier(model, model.head, partial(mixmim_layer_id, depths=depths), sum(depths) + 1,
                            no_weight_decay=(), allowed_missing=("head.",), ignored_unexpected=(), grid=encoder.grid)
    classifier.key_map = lambda state: {"encoder." + k: v for k, v in state.items() if not k.endswith("attn_mask")}
    classifier.rel_pos_mode = "bicubic"  # MixMIM resizes RPB tables with F.interpolate(bicubic)
    # models_mixmim_ft.py no_weight_decay() is empty: the 2-D relative position tables are decayed (the fixed
    # sin-cos absolute_pos_embed is not trained)
    return classifier


def _hivit(backbone: Mapping[str, Any], img_size: int | Sequence[int], num_classes: int, probe: bool,
           drop_path: float, head_init_std: float, layer_scale_init: float | None = None) -> Classifier:
    from timm.layers import trunc_normal_

    from mim_lightning.models.backbones.hivit import PatchMerge, hivit_from_spec

    encoder = hivit_from_spec(backbone, img_size, rpe=True, drop_path_rate=0.0 if probe else drop_path,
                              layer_scale_init=None if layer_scale_init is None else float(layer_scale_init))
    model = HiViTClassifier(encoder, num_classes)
    trunc_normal_(model.head.weight, std=head_init_std)
    nn.init.zeros_(model.head.bias)
    if probe:
        model.head = nn.Sequential(nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6), model.head)
    merges = [i for i, block in enumerate(encoder.blocks) if isinstance(block, PatchMerge)]
    num_layers = len(encoder.blocks) - len(merges) + 1
    classifier = Classifier(model, model.head, partial(hivit_layer_id, merge_blocks=merges, num_layers=num_layers),
                            num_layers, no_weight_decay=(), allowed_missing=("head.", "fc_norm."),
                            ignored_unexpected=(), grid=encoder.grid)
    classifier.allowed_missing_suffixes = ("relative_position_bias_table",)  # not in pixel checkpoints: zeros
    classifier.key_map = lambda state: {"encoder." + k: v for k, v in state.items()}
    # models_itpn.py no_weight_decay() = {absolute_pos_embed}; the tables by name, as param_groups_lrd
    classifier.no_weight_decay_keys = ("absolute_pos_embed", "relative_position_bias_table")
    # iTPN normalizes the decay to a 12-block ViT-B depth: decay_eff = decay ** (13 / num_layers).
    classifier.effective_decay = lambda decay: decay ** (13.0 / num_layers)
    return classifier


# --------------------------------------------------------------------------- loading pretrained weights


def read_pretrained(path: str | Path, method: str, method_target: str | None = None,
                    encoder_prefix: str = "model.encoder.", backbone: Mapping[str, Any] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The encoder weights in ``path``, with the encoder's own (timm) key names.

    ``path`` is a pretraining checkpoint of this project (``.ckpt`` file, or the sharded folder of a
    ``trainer=fsdp`` run: the ``model.encoder.*`` keys; the stored
    config must name the same model class ``method_target``), an official checkpoint of ``method`` (``.pth``,
    converted with :func:`mim_lightning.checkpoints.convert_official`) or an exported encoder
    (``.safetensors``). A missing file, a checkpoint of another method or (for project checkpoints) of another
    backbone size than ``backbone`` is a one-line :class:`ConfigError`.
    """
    from mim_lightning.checkpoints import convert_official

    file = Path(str(path)).expanduser()
    if not file.is_file() and not file.is_dir():
        raise ConfigError("pretrained", str(path), "an existing .ckpt, .pth or .safetensors file", "no such file")
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        from mim_lightning.export import timm_to_swin

        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
        state = dict(load_file(str(file)))
        # exports hold the encoder's own (official) names, except Swin in timm's layout: map it back
        return timm_to_swin(state) if meta.get("format") == "timm" and meta.get("family") == "swin" else state
    try:
        if file.is_dir():  # a sharded (trainer=fsdp) checkpoint folder, read whole on this one process
            from mim_lightning.parallel import is_sharded_checkpoint, load_sharded

            if not is_sharded_checkpoint(file):
                raise ConfigError("pretrained", str(path), "a .ckpt file or a sharded checkpoint folder (trainer=fsdp)",
                                  "a folder without meta.pt and .metadata")
            content = load_sharded(file)
        else:
            content = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise ConfigError("pretrained", str(path), "a checkpoint written by torch.save",
                          f"cannot be read ({type(exc).__name__})") from None
    if not isinstance(content, Mapping):
        raise ConfigError("pretrained", str(path), "a checkpoint holding a state dict", f"holds a {type(content).__name__}")
    if "state_dict" in content and "hyper_parameters" in content:  # a Lightning checkpoint of this project
        config = (content.get("hyper_parameters") or {}).get("config") or {}
        stored = ((config.get("method") or {}).get("model") or {}).get("_target_")
        if method_target is not None and stored is not None and stored != method_target:
            raise ConfigError("pretrained", str(path), f"a {method} pretraining checkpoint ({method_target})",
                              f"it holds a {stored} model; pass the matching method=")
        stored_backbone = config.get("backbone") or {}
        if backbone is not None and stored_backbone:
            sizes = ("family", "patch_size", "embed_dim", "depth", "depths", "num_heads")
            differ = [k for k in sizes if stored_backbone.get(k) != backbone.get(k)]
            if differ:
                raise ConfigError("pretrained", str(path), f"a checkpoint of backbone={backbone.get('name')}",
                                  f"it was pretrained with backbone={stored_backbone.get('name')} ({differ[0]} "
                                  f"{stored_backbone.get(differ[0])} vs {backbone.get(differ[0])}): another size")
        state = {k[len(encoder_prefix):]: v for k, v in content["state_dict"].items() if k.startswith(encoder_prefix)}
        if not state:
            raise ConfigError("pretrained", str(path), f"a {method} pretraining checkpoint with {encoder_prefix}* keys",
                              "no encoder weights found")
        return state
    converted = convert_official(method, content)
    return {k[len("encoder."):]: v for k, v in converted.items() if k.startswith("encoder.")}


def _grid_text(tokens: int) -> str:
    side = math.isqrt(max(int(tokens), 0))
    return f"{side}x{side}" if side * side == tokens else f"{tokens} tokens"


def _window_text(rows: int) -> str:
    """The window of a (2w-1)^2-row relative position table."""
    side = math.isqrt(max(int(rows), 0))
    return f"{(side + 1) // 2}x{(side + 1) // 2}" if side * side == rows else f"{rows} rows"


def _names(keys: Sequence[str]) -> str:
    """Parameter names grouped by module (``head``, ``fc_norm``, ``relative_position_bias_table x12``)."""
    groups: dict[str, int] = {}
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        name = leaf if leaf in ("relative_position_bias_table", "relative_position_index", "gamma_1", "gamma_2") \
            else key.split(".", 1)[0]
        groups[name] = groups.get(name, 0) + 1
    return ", ".join(name if count == 1 or not name.startswith("relative") else f"{name} x{count}"
                     for name, count in groups.items())


def load_report_line(report: Mapping[str, Any], path: str | Path) -> str:
    """The one line a finetuning run prints about what :func:`load_encoder` did."""
    parts = [f"{report['loaded']} tensors loaded"]
    if report["resized"]:
        parts.append(f"{len(report['resized'])} resized ({'; '.join(report['resized'])})")
    parts.append(f"{len(report['missing'])} missing" + (f", initialised ({_names(report['missing'])})"
                                                        if report["missing"] else ""))
    parts.append(f"{len(report['unexpected'])} unexpected" + (f", ignored ({_names(report['unexpected'])})"
                                                              if report["unexpected"] else ""))
    return f"pretrained={path}: " + "; ".join(parts)


def load_encoder(classifier: Classifier, state: Mapping[str, torch.Tensor], source: str = "pretrained") -> dict:
    """Load encoder weights into ``classifier.model``: the pos-embed is resized (bicubic) to the model's grid,
    the head and ``fc_norm`` stay as initialized, unused ``norm.*`` weights (global pool) are ignored; any other
    missing key or shape difference is a :class:`ConfigError` naming the key (e.g. a checkpoint of another size).

    Swin-type encoders: keys are mapped to the classifier's names (``key_map``), relative-position-bias tables of
    another window are resized (SimMIM: geometric resampling; MixMIM: bicubic), index buffers recomputed, and a
    fixed ``absolute_pos_embed`` resized bicubically to the new grid. SimMIM ViT: the shared table is copied to
    every block (``key_map``) and resized to the new patch grid with its 3 cls rows kept.

    Returns ``{"loaded": int, "resized": [text], "missing": [keys initialised here], "unexpected": [checkpoint
    keys ignored]}`` (see :func:`load_report_line`)."""
    from mim_lightning.checkpoints import resize_pos_embed, resize_rel_pos_bias

    model = classifier.model
    own = model.state_dict()
    key_map = getattr(classifier, "key_map", None)
    state = dict(key_map(state) if key_map is not None else state)
    mode = getattr(classifier, "rel_pos_mode", "geometric")
    resized: list[str] = []
    tables: dict[tuple[int, int], int] = {}
    for key, value in list(state.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        if key.endswith("relative_position_bias_table"):
            extra = int(getattr(classifier, "rel_pos_extra_rows", 0))  # BEiT-style tables end with 3 cls rows
            window = classifier.grid if extra else (math.isqrt(own[key].shape[0]) + 1) // 2
            state[key] = resize_rel_pos_bias(value, window, mode=mode, num_extra_tokens=extra)
            pair = (int(value.shape[0]) - extra, int(own[key].shape[0]) - extra)
            tables[pair] = tables.get(pair, 0) + 1
        elif key.endswith("relative_position_index"):
            state[key] = own[key]  # recomputed for the new window
        elif key.endswith("absolute_pos_embed") and value.shape[-1] == own[key].shape[-1]:
            state[key] = resize_pos_embed(value, classifier.grid, num_prefix_tokens=0)
            resized.append(f"{key} {_grid_text(value.shape[1])} -> {_grid_text(own[key].shape[1])}")
    for (old, new), count in sorted(tables.items()):
        resized.append(f"relative_position_bias_table x{count} window {_window_text(old)} -> {_window_text(new)}")
    ignored = classifier.ignored_unexpected + ("head.", "fc_norm.")
    unexpected = sorted(k for k in state if k.startswith(ignored))
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        if state["pos_embed"].shape[-1] != own["pos_embed"].shape[-1]:
            raise ConfigError(source, "pos_embed " + str(tuple(state["pos_embed"].shape)),
                              f"an encoder of width {own['pos_embed'].shape[-1]} (the chosen backbone)",
                              "the checkpoint has another embedding width (another size)")
        prefix = own["pos_embed"].shape[1] - classifier.grid[0] * classifier.grid[1]
        resized.append(f"pos_embed {_grid_text(state['pos_embed'].shape[1] - prefix)} -> "
                       f"{classifier.grid[0]}x{classifier.grid[1]}")
        state = {**state, "pos_embed": resize_pos_embed(state["pos_embed"], classifier.grid)}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ConfigError(source, key, f"shape {tuple(own[key].shape)} (the chosen backbone)",
                              f"the checkpoint has {tuple(value.shape)}: a checkpoint of another size")
    result = model.load_state_dict(state, strict=False)
    suffixes = getattr(classifier, "allowed_missing_suffixes", ())
    missing = [k for k in result.missing_keys
               if not k.startswith(classifier.allowed_missing) and not (suffixes and k.endswith(suffixes))]
    if missing:
        raise ConfigError(source, f"{len(missing)} missing keys, e.g. {missing[0]}",
                          "an encoder with the chosen backbone's keys", "a checkpoint of another size or family")
    if result.unexpected_keys:
        raise ConfigError(source, f"unexpected key {result.unexpected_keys[0]}",
                          "an encoder with the chosen backbone's keys", "a checkpoint of another size or family")
    return {"loaded": len(state), "resized": resized, "missing": sorted(result.missing_keys), "unexpected": unexpected}


# --------------------------------------------------------------------------- the LightningModule


class FinetuneModule(pl.LightningModule):
    """Supervised training of a classifier from a pretrained encoder.

    Args:
        model: the classifier; ``model(images) -> logits (B, num_classes)``.
        num_classes: number of classes (top-5 is logged only with more than 5 classes).
        mode: ``finetune`` (all weights; layer-wise lr decay) or ``linear_probe`` (head only; LARS).
        layer_id, num_layers: the family's layer-id map; a parameter of layer ``i`` gets
            ``lr_scale = layer_decay ** (num_layers - i)``.
        layer_decay: the decay (1.0 = off).
        optimizer: a partial optimizer taking param groups and ``lr``, or ``"lars"`` (timm ``Lars``, momentum
            0.9, trust 0.001; 1-D parameters neither decayed nor adapted, as ``mae:util/lars.py``).
        weight_decay, no_weight_decay: decay of the decayed group; names never decayed (besides 1-D params).
        lr: ``base`` per ``base_batch_size`` (or absolute ``value``), ``min``, ``warmup_epochs``/``warmup_steps``,
            ``warmup_start``; per-step linear warm-up then half-cycle cosine (``mae:util/lr_sched.py``);
            ``scale_min_and_warmup`` scales ``min`` and ``warmup_start`` by the batch factor and ``cosine_from: start``
            runs the cosine over the absolute step (SimMIM's timm ``CosineLRScheduler``).
        mixup, cutmix, mixup_prob, mixup_switch_prob, mixup_mode, smoothing: timm ``Mixup`` (label smoothing
            folded into the soft targets, ``SoftTargetCrossEntropy``); without mixing, label smoothing CE.
        batch_size: per-device batch (for the lr rule); config: the resolved run config (kept in checkpoints).

    Logs ``finetune/train_loss``, ``train/lr``, ``finetune/val_loss``, ``finetune/val_top1``, ``finetune/val_top5``
    (more than 5 classes). Held-out items marked ``valid: False`` (an unreadable image's stand-in) are left out of
    the validation metrics. At the end of fitting the last and best ``finetune/val_top1`` are printed.
    """

    def __init__(self, model: nn.Module, num_classes: int, mode: str = "finetune",
                 layer_id: Callable[[str], int] | None = None, num_layers: int = 1, layer_decay: float = 1.0,
                 optimizer: Callable[..., torch.optim.Optimizer] | str | None = None, weight_decay: float = 0.05,
                 no_weight_decay: Sequence[str] = (), lr: Mapping[str, Any] | None = None, mixup: float = 0.0,
                 cutmix: float = 0.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5, mixup_mode: str = "batch",
                 smoothing: float = 0.0, batch_size: int = 64, config: Mapping[str, Any] | None = None,
                 no_weight_decay_keys: Sequence[str] = ()) -> None:
        super().__init__()
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from torchmetrics.classification import MulticlassAccuracy

        if mode not in MODES:
            raise ConfigError("mode", mode, ", ".join(MODES))
        self.model = model
        # decided before a strategy (FSDP) flattens every parameter to 1-D
        self._one_dim = {unwrapped_name(n) for n, p in model.named_parameters() if p.ndim <= 1}
        self.num_classes = int(num_classes)
        self.mode = mode
        self.layer_id = layer_id or (lambda name: num_layers)
        self.num_layers = int(num_layers)
        self.layer_decay = float(layer_decay)
        self.optimizer_factory = optimizer if optimizer is not None else partial(torch.optim.AdamW, betas=(0.9, 0.999))
        self.weight_decay = float(weight_decay)
        self.no_weight_decay = tuple(no_weight_decay)
        self.lr_config = {**DEFAULT_LR, **dict(lr or {})}
        self.batch_size = int(batch_size)
        self.mixup_fn = None
        if (mixup > 0 or cutmix > 0) and mode == "finetune":
            if self.batch_size % 2:
                raise ConfigError("data.batch_size", batch_size, "an even number with Mixup/CutMix",
                                  "timm Mixup pairs the images of a batch")
            self.mixup_fn = Mixup(mixup_alpha=float(mixup), cutmix_alpha=float(cutmix), prob=float(mixup_prob),
                                  switch_prob=float(mixup_switch_prob), mode=mixup_mode,
                                  label_smoothing=float(smoothing), num_classes=self.num_classes)
            self.train_criterion: nn.Module = SoftTargetCrossEntropy()
        elif smoothing > 0 and mode == "finetune":
            self.train_criterion = LabelSmoothingCrossEntropy(smoothing=float(smoothing))
        else:
            self.train_criterion = nn.CrossEntropyLoss()
        self.no_weight_decay_keys = tuple(no_weight_decay_keys)
        self.top1 = MulticlassAccuracy(num_classes=self.num_classes, top_k=1, average="micro")
        # top-k only where it can miss: with k >= num_classes every prediction is a top-k hit
        self.top5 = (MulticlassAccuracy(num_classes=self.num_classes, top_k=5, average="micro")
                     if self.num_classes > 5 else None)
        self.val_top1_history: list[tuple[int, float]] = []
        self.save_hyperparameters(ignore=["model", "optimizer", "layer_id"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` shard the classifier with FSDP2 (one unit per block; :mod:`mim_lightning.parallel`);
        nothing under other strategies. Layer-decay groups use the names taken before sharding (unchanged by FSDP2)."""
        from mim_lightning.parallel import shard_module

        shard_module(self)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["images"], batch["label"]
        targets = labels
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, labels)
        loss = self.train_criterion(self.model(images), targets)
        if not torch.isfinite(loss):
            from mim_lightning.modules.pretrain import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite finetuning loss ({loss.item()}) at step {self.global_step}; "
                                     "lower finetune.lr.base or use bf16 instead of fp16")
        self.log("finetune/train_loss", loss.detach(), prog_bar=True, batch_size=images.shape[0])
        # A host tensor: a Python float would be copied to the device with a blocking copy every step.
        self.log("train/lr", torch.tensor(float(self.optimizers().param_groups[-1]["lr"])), batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(batch["images"])
        labels = batch["label"]
        valid = batch.get("valid")
        if valid is not None and not bool(valid.all()):  # stand-ins for unreadable images: not scored
            logits, labels = logits[valid], labels[valid]
        size = labels.shape[0]
        if size == 0:
            return
        self.top1(logits, labels)
        self.log("finetune/val_loss", nn.functional.cross_entropy(logits, labels), sync_dist=True, batch_size=size)
        self.log("finetune/val_top1", self.top1, prog_bar=True, batch_size=size)
        if self.top5 is not None:
            self.top5(logits, labels)
            self.log("finetune/val_top5", self.top5, batch_size=size)

    def on_validation_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        value = self.trainer.callback_metrics.get("finetune/val_top1")
        if value is not None:
            self.val_top1_history.append((int(self.current_epoch), float(value)))

    def on_fit_end(self) -> None:
        """One line with the last and the best validation top-1 of the run (rank 0)."""
        if not self.val_top1_history:
            return
        epoch, last = self.val_top1_history[-1]
        best_epoch, best = max(self.val_top1_history, key=lambda item: (item[1], -item[0]))
        runlog.info(f"{self.mode}: finetune/val_top1 final {last:.4f} (epoch {epoch}), best {best:.4f} "
                    f"(epoch {best_epoch})")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("mim_lightning", {})["val_top1_history"] = list(self.val_top1_history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        history = (checkpoint.get("mim_lightning") or {}).get("val_top1_history") or []
        self.val_top1_history = [(int(e), float(v)) for e, v in history]

    # ------------------------------------------------------------------ optimizer
    def effective_batch_size(self) -> int:
        from mim_lightning.parallel import data_parallel_size

        return self.batch_size * data_parallel_size(self.trainer) * int(self.trainer.accumulate_grad_batches)

    def learning_rate(self) -> float:
        if self.lr_config["value"] is not None:
            return float(self.lr_config["value"])
        return scaled_lr(float(self.lr_config["base"]), self.effective_batch_size(), int(self.lr_config["base_batch_size"]))

    def schedule_steps(self) -> tuple[int, int]:
        total = int(self.trainer.estimated_stepping_batches)
        if self.lr_config["warmup_steps"] is not None:
            return min(int(self.lr_config["warmup_steps"]), total), total
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            raise ConfigError("finetune.lr.warmup_epochs", self.lr_config["warmup_epochs"],
                              "finetune.lr.warmup_steps for data without a known epoch length")
        per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        return min(int(round(float(self.lr_config["warmup_epochs"]) * per_epoch)), total), total

    def param_groups(self, lr: float) -> list[dict]:
        if self.optimizer_factory == "lars":
            named = [(unwrapped_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
            decay = [p for n, p in named if n not in self._one_dim]
            flat = [p for n, p in named if n in self._one_dim]
            groups = [{"params": decay, "weight_decay": self.weight_decay, "always_adapt": True, "lr_scale": 1.0},
                      {"params": flat, "weight_decay": 0.0, "always_adapt": False, "lr_scale": 1.0}]
            groups = [g for g in groups if g["params"]]
        else:
            skip = [unwrapped_name(n) for n, _ in self.model.named_parameters()
                    if any(k in n for k in self.no_weight_decay_keys)]
            groups = layer_decay_param_groups(self.model, self.weight_decay, self.layer_decay, self.layer_id,
                                              self.num_layers, [*self.no_weight_decay, *skip], one_dim=self._one_dim)
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
        return groups

    def configure_optimizers(self):
        lr = self.learning_rate()
        groups = self.param_groups(lr)
        if self.optimizer_factory == "lars":
            from timm.optim import Lars

            optimizer = Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)
        elif callable(self.optimizer_factory):
            from mim_lightning.parallel import optimizer_device

            optimizer = make_optimizer(self.optimizer_factory, groups, lr, optimizer_device(self))  # fused AdamW on CUDA
        else:
            raise ConfigError("finetune.optimizer", self.optimizer_factory, "lars or an optimizer _target_ (AdamW)")
        warmup, total = self.schedule_steps()
        scale = 1.0
        if self.lr_config["scale_min_and_warmup"] and self.lr_config["value"] is None:
            scale = self.effective_batch_size() / int(self.lr_config["base_batch_size"])
        start = float(self.lr_config["warmup_start"]) * scale / lr if lr > 0 else 0.0
        schedule = partial(warmup_cosine_factor, warmup_steps=warmup, total_steps=total,
                           min_factor=float(self.lr_config["min"]) * scale / lr if lr > 0 else 0.0,
                           warmup_start_factor=start, cosine_from_start=self.lr_config["cosine_from"] == "start")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        rank_zero_info(f"[mim_lightning] {self.mode}: effective batch {self.effective_batch_size()}; lr {lr:.3g}; "
                       f"layer decay {self.layer_decay}; warm-up {warmup} of {total} optimizer steps")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


# --------------------------------------------------------------------------- from a composed config


def method_name(cfg: DictConfig) -> str:
    """The method (``method=`` choice) of a composed finetune config."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices["method"])
    except Exception:  # noqa: BLE001 - compose() outside a Hydra app keeps the choices in cfg.hydra
        pass
    choices = (cfg.get("hydra") or {}).get("runtime", {}).get("choices", {}) if "hydra" in cfg else {}
    if choices and choices.get("method"):
        return str(choices["method"])
    target = str(cfg.method.model._target_)
    return target.split(".")[-2]


def count_classes(cfg: DictConfig) -> int:
    """``num_classes``, or the number of class sub-folders of the labelled source."""
    if cfg.get("num_classes") is not None:
        return int(cfg.num_classes)
    from mim_lightning.data.classification import labelled_source

    names = labelled_source(cfg).class_names()
    if len(names) < 2:
        raise ConfigError("data.root", cfg.data.get("root"), "a folder with a sub-folder per class (two or more)",
                          f"found {len(names)} class sub-folders")
    return len(names)


def build_finetune_module(cfg: DictConfig, num_classes: int | None = None) -> FinetuneModule:
    """The finetuning (or linear-probing, ``cfg.mode``) module of a composed ``conf/finetune.yaml``, with
    ``cfg.pretrained`` loaded into its encoder."""
    from mim_lightning.config import instantiate_checked, to_container

    mode = str(cfg.get("mode", "finetune"))
    if mode not in MODES:
        raise ConfigError("mode", mode, ", ".join(MODES))
    recipe = cfg.finetune
    num_classes = count_classes(cfg) if num_classes is None else int(num_classes)
    probe = mode == "linear_probe"
    lp = recipe.get("linear_probe") or {}
    kind = str(recipe.get("classifier", "vit_avg"))
    feature = str(lp.get("feature", "avg")) if probe else None
    if feature in CLASSIFIERS:  # a classifier kind named as the probe feature
        kind, feature = feature, None
    elif feature is not None and feature not in PROBE_FEATURES:
        raise ConfigError("finetune.linear_probe.feature", feature, ", ".join(PROBE_FEATURES))
    head_std = float(lp.get("head_init_std", 0.01) if probe else recipe.get("head_init_std", 2e-5))
    window = recipe.get("window_size")
    block = lp.get("block") if probe else None
    scale = recipe.get("layer_scale_init")
    classifier = build_classifier(kind, cfg.backbone, cfg.data.image_size, num_classes, mode,
                                  drop_path=float(recipe.get("drop_path", 0.0)), head_init_std=head_std,
                                  window_size=None if window is None else (list(window) if not isinstance(window, int)
                                                                           else int(window)),
                                  probe_feature=feature, probe_block=block,
                                  layer_scale_init=None if scale is None else float(scale))
    if cfg.get("pretrained"):
        state = read_pretrained(cfg.pretrained, method_name(cfg), str(cfg.method.model._target_),
                                str(recipe.get("encoder_prefix", "model.encoder.")), backbone=cfg.backbone)
        runlog.info(load_report_line(load_encoder(classifier, state), cfg.pretrained))
    if probe:
        for param in classifier.model.parameters():
            param.requires_grad = False
        for param in classifier.head.parameters():
            param.requires_grad = True
        optimizer: Any = str(lp.get("optimizer", "lars"))
        if optimizer != "lars":
            optimizer = instantiate_checked(lp.optimizer)
        lr, weight_decay, layer_decay = dict(lp.get("lr") or {}), float(lp.get("weight_decay", 0.0)), 1.0
    else:
        optimizer = instantiate_checked(recipe.optimizer)
        lr, weight_decay = dict(recipe.get("lr") or {}), float(recipe.get("weight_decay", 0.05))
        layer_decay = float(recipe.get("layer_decay", 1.0))
        if hasattr(classifier, "effective_decay"):
            layer_decay = classifier.effective_decay(layer_decay)
    config = to_container(cfg)
    return FinetuneModule(
        classifier.model, num_classes, mode=mode, layer_id=classifier.layer_id, num_layers=classifier.num_layers,
        layer_decay=layer_decay, optimizer=optimizer, weight_decay=weight_decay,
        no_weight_decay=classifier.no_weight_decay, lr=lr, mixup=float(recipe.get("mixup", 0.0)),
        cutmix=float(recipe.get("cutmix", 0.0)), mixup_prob=float(recipe.get("mixup_prob", 1.0)),
        mixup_switch_prob=float(recipe.get("mixup_switch_prob", 0.5)), mixup_mode=str(recipe.get("mixup_mode", "batch")),
        smoothing=float(recipe.get("smoothing", 0.0)), batch_size=int(cfg.data.batch_size), config=config,
        no_weight_decay_keys=(*getattr(classifier, "no_weight_decay_keys", ()),
                              *[str(k) for k in (recipe.get("no_weight_decay_keys") or [])]))
