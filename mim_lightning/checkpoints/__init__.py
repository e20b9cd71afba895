"""The checkpoint room: atomic checkpoint files (``io``), official checkpoints (``official``), weight surgery
(``resize``), timm key maps and model names for export (``timm_keys``), and reading pretrained weights into a
finetuning classifier (``pretrained``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mim_lightning.checkpoints.official import unwrap_state_dict
from mim_lightning.checkpoints.resize import expand_shared_rel_pos_bias, resize_pos_embed, resize_rel_pos_bias

__all__ = ["convert_official", "expand_shared_rel_pos_bias", "resize_pos_embed", "resize_rel_pos_bias",
           "unwrap_state_dict"]


def convert_official(method: str, state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Map an official pretraining checkpoint of ``method`` (a ``method=`` name or alias) to this project's
    pretraining-model keys. ``state_dict`` may be the file's whole content (``{'model': ...}``). Raises
    :class:`ConfigError` naming the method for an unknown method or a state dict of another layout."""
    from mim_lightning.methods import spec_named

    return spec_named(method).convert_official(unwrap_state_dict(state_dict))
