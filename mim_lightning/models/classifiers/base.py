"""What every finetuning classifier builder returns, and the pieces they share (head init, the probe head).

A builder (``finetune.classifier._target_`` of ``conf/finetune/<method>.yaml``) is constructed with the backbone
mapping, the image size and its recipe values; ``build(num_classes, probe)`` returns a :class:`Classifier`:
the ``nn.Module`` plus what the finetuning module and the weight loader need to know about it (its head,
layer-id map for layer-wise lr decay, no-decay rules, how pretrained encoder keys map onto it). ``probe`` is
``None`` for finetuning or the linear-probe recipe (``feature``, ``block``, ``head_init_std``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from mim_lightning.errors import ConfigError


@dataclass
class Classifier:
    """A built classifier and its finetuning facts.

    ``layer_id(name) -> int`` with ``num_layers``: a parameter of layer ``i`` trains at
    ``layer_decay ** (num_layers - i)``. ``no_weight_decay``: exact names never decayed (besides 1-D parameters);
    ``no_weight_decay_keys``: name substrings never decayed. Loading pretrained encoder weights:
    ``key_map(state) -> state`` renames them to the classifier's keys; keys starting with ``allowed_missing`` (or
    ending with ``allowed_missing_suffixes``) may be absent, keys starting with ``ignored_unexpected`` are
    dropped; relative position tables of another window are resized with ``rel_pos_mode`` (``geometric``: SimMIM;
    ``bicubic``: MixMIM), keeping ``rel_pos_extra_rows`` trailing cls rows (BEiT-style tables); ``grid`` is the
    classifier's token grid (for position-embedding resizing). ``decay_power``: the layer decay used is
    ``layer_decay ** decay_power`` (iTPN rescales it to a 12-block depth)."""

    model: nn.Module
    head: nn.Module
    layer_id: Callable[[str], int]
    num_layers: int
    grid: tuple[int, int]
    no_weight_decay: tuple[str, ...] = ()
    no_weight_decay_keys: tuple[str, ...] = ()
    allowed_missing: tuple[str, ...] = ("head.",)
    allowed_missing_suffixes: tuple[str, ...] = ()
    ignored_unexpected: tuple[str, ...] = ()
    key_map: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    rel_pos_mode: str = "geometric"
    rel_pos_extra_rows: int = 0
    decay_power: float = 1.0


def init_head(linear: nn.Linear, std: float) -> None:
    """``trunc_normal_(std)`` weights and zero bias, as the official finetuning code after loading."""
    from timm.layers import trunc_normal_

    trunc_normal_(linear.weight, std=float(std))
    nn.init.zeros_(linear.bias)


def probe_head(dim: int, linear: nn.Module) -> nn.Sequential:
    """MAE's linear-probe head: ``BatchNorm1d(dim, affine=False, eps=1e-6)`` then the linear layer."""
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


class ClassifierBuilder:
    """Base of the classifier builders: checks the backbone family and the probe feature.

    Subclasses set ``family`` (the backbone family they are built from) and ``probe_features`` and implement
    :meth:`build`; ``export`` (a static method taking the
    classifier's state without the head and the run config) makes finetuning checkpoints exportable."""

    family: ClassVar[str] = ""
    probe_features: ClassVar[tuple[str, ...]] = ("avg",)
    export: ClassVar[Callable[..., tuple[dict, dict]] | None] = None

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int], drop_path: float = 0.0,
                 head_init_std: float = 2e-5) -> None:
        found = backbone.get("family")
        if found != self.family:
            raise ConfigError("backbone", backbone.get("name", found),
                              f"{self.family}_* backbones for the {type(self).__name__} classifier",
                              f"the '{found}' family does not fit this method's finetuning classifier")
        self.backbone = dict(backbone)
        self.img_size = img_size
        self.drop_path = float(drop_path)
        self.head_init_std = float(head_init_std)

    def probe_feature(self, probe: Mapping[str, Any] | None) -> str | None:
        """The linear probe's feature (checked against ``probe_features``), None when finetuning."""
        if probe is None:
            return None
        feature = str(probe.get("feature") or self.probe_features[0])
        if feature not in self.probe_features:
            raise ConfigError("finetune.linear_probe.feature", feature, ", ".join(self.probe_features),
                              f"the {type(self).__name__} classifier has no '{feature}' probe feature")
        return feature

    def head_std(self, probe: Mapping[str, Any] | None) -> float:
        return float(probe.get("head_init_std", 0.01)) if probe is not None else self.head_init_std

    def build(self, num_classes: int, probe: Mapping[str, Any] | None = None) -> Classifier:
        raise NotImplementedError
