"""ToyMIM's method spec: its "official" checkpoints are its own state dicts; the encoder exports as a timm ViT."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mim_lightning.checkpoints.official import require_key
from mim_lightning.checkpoints.timm_keys import timm_export, vit_timm_spec
from mim_lightning.methods import MethodSpec, register
from toy_method.model import ToyMIM


def convert_official(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    require_key(out, "encoder.pos_embed", "ToyMIM", "encoder.*, position, head.*")
    return out


def export(encoder: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[dict, dict]:
    name, kwargs = vit_timm_spec(config["backbone"], config["data"]["image_size"])
    return timm_export(encoder, name, kwargs, "vit", SPEC.target)


SPEC = register(MethodSpec(name="toy", model=ToyMIM, convert_official=convert_official, export=export))
