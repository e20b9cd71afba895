"""Official pretraining checkpoints: reading the file's tensors, and the helpers every method's converter uses.

Each method's converter (``MethodSpec.convert_official`` in ``methods/<name>/spec.py``, called by
:func:`mim_lightning.checkpoints.convert_official`) maps an official *pretraining* checkpoint to the keys of this
project's pretraining model; the result loads with ``model.load_state_dict(converted, strict=True)`` when the
official file holds the whole model (MAE's ``*_full.pth``), and its ``encoder.*`` part loads into the finetuning
classifiers in every case. No network access: give it the state dict you downloaded yourself
(``torch.load(path)["model"]``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mim_lightning.errors import ConfigError

#: Buffers the official code saves and this project recomputes (non-persistent here).
DERIVED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The tensor dict inside an official checkpoint file: ``ckpt['model']`` (MAE, SimMIM, MixMIM, iTPN),
    ``ckpt['state_dict']`` or the mapping itself; a ``module.`` (DDP) prefix is removed."""
    for key in ("model", "state_dict", "module"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def require_key(out: Mapping[str, torch.Tensor], key: str, method: str, layout: str) -> None:
    """A one-line error when a converted state dict lacks ``key`` (a file of another method)."""
    if key not in out:
        raise ConfigError("pretrained", method, f"an official {method} checkpoint ({layout})",
                          f"the state dict has no '{key}'; is it a checkpoint of another method?")


def route_keys(state: Mapping[str, torch.Tensor], routes: tuple[tuple[str, tuple[str, ...]], ...],
               drop: tuple[str, ...], method: str, source: str) -> dict[str, torch.Tensor]:
    """Prefix each official key with the project module it belongs to: ``routes`` pairs a prefix to add
    with the official key prefixes it takes, first match wins; keys ending in ``drop`` are skipped and
    any other key is a one-line error naming it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(drop):
            continue
        target = next((prefix for prefix, starts in routes if key.startswith(starts)), None)
        if target is None:
            raise ConfigError("pretrained", key, f"keys of an official {method} checkpoint ({source})",
                              f"unknown key for {method}")
        out[target + key] = value
    return out
