"""Pooled encoder features of any pretraining model, for kNN and linear probes (no model file changes).

``pooled_features(model, images) -> (B, D)`` runs only the model's *encoder* on the whole, unmasked
image and pools its output tokens into one vector per image:

- :class:`~mim_lightning.methods.mae.model.MaskedAutoencoder`: ``encoder(images)`` on all patches (no
  ``keep_ids``); the final-norm tokens pooled as the mean of the patch tokens (``pool="mean"``) or the
  cls token (``pool="cls"``, MAE's linear-probe protocol). D = ``embed_dim``.
- :class:`~mim_lightning.methods.simmim.model.SimMIM`: ``encoder.forward_tokens(images, None)`` (no mask
  token). ViT: final-norm patch tokens (mean) or cls; Swin: mean of the final-norm last-stage map.
  D = ``num_features``.
- :class:`~mim_lightning.methods.mixmae.model.MixMAE`: ``encoder(images)`` with no mixing mask (the plain
  Swin-W14 forward); mean of the final-norm last-stage tokens (MixMIM's finetuning pool). D = ``num_features``.
- :class:`~mim_lightning.methods.itpn.model.ITPNPixel`, :class:`~mim_lightning.methods.itpn_clip.model.ITPNClip`:
  ``encoder(images)`` (stems and main stage on every unit); mean of the main-stage tokens. HiViT has no
  final norm (iTPN's finetuning adds an ``fc_norm`` after pooling); the linear probe's BatchNorm and the
  kNN's L2 normalization make the scale irrelevant. D = ``embed_dim``.

Other models: a model that defines ``pooled_features(images, pool)`` is used as is, and
:func:`register_pooler` adds a function for a model class (a new method's module can register itself).
The features are those of the model's current mode; the probes call this under ``torch.no_grad()``
with the model in eval mode (no drop path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

POOLS = ("mean", "cls")

Pooler = Callable[[nn.Module, torch.Tensor, str], torch.Tensor]
_POOLERS: dict[type, Pooler] = {}


def register_pooler(model_class: type, function: Pooler) -> None:
    """Use ``function(model, images, pool) -> (B, D)`` for instances of ``model_class`` (and subclasses)."""
    _POOLERS[model_class] = function


def _pool_cls_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1 + L, D) tokens with cls first -> (B, D): cls, or the mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


def _pool_tokens(tokens: torch.Tensor, pool: str, what: str) -> torch.Tensor:
    """(B, ..., D) tokens without cls -> mean over every token axis (B, D)."""
    if pool == "cls":
        raise ValueError(f"pool='cls': the {what} encoder has no cls token; use pool='mean'")
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).mean(dim=1)


def _mae(model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    return _pool_cls_tokens(model.encoder(images), pool)


def _simmim(model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    tokens = model.encoder.forward_tokens(images, None)
    if model.family == "vit":
        return _pool_cls_tokens(tokens, pool)
    return _pool_tokens(tokens, pool, "Swin")  # (B, h, w, C)


def _mixmae(model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    return _pool_tokens(model.encoder(images), pool, "MixMIM")


def _hivit(model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    return _pool_tokens(model.encoder(images), pool, "HiViT")


def _builtin_poolers() -> dict[type, Pooler]:
    from mim_lightning.methods.itpn.model import ITPNPixel
    from mim_lightning.methods.itpn_clip.model import ITPNClip
    from mim_lightning.methods.mae.model import MaskedAutoencoder
    from mim_lightning.methods.mixmae.model import MixMAE
    from mim_lightning.methods.simmim.model import SimMIM

    return {MaskedAutoencoder: _mae, SimMIM: _simmim, MixMAE: _mixmae, ITPNPixel: _hivit, ITPNClip: _hivit}


def find_pooler(model: nn.Module) -> Pooler:
    """The pooling function for ``model``'s class (nearest registered base class first)."""
    if hasattr(model, "pooled_features"):
        return lambda m, images, pool: m.pooled_features(images, pool)
    known = {**_builtin_poolers(), **_POOLERS}
    for cls in type(model).__mro__:
        if cls in known:
            return known[cls]
    names = ", ".join(sorted(c.__name__ for c in known))
    raise TypeError(f"pooled_features: no feature pooling for {type(model).__name__} (known: {names}); "
                    "give the model a pooled_features(images, pool) method or call register_pooler")


def pooled_features(model: nn.Module, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """Encoder features of the unmasked ``images`` (B, 3, H, W), pooled to (B, D); see the module docstring."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}: expected one of {', '.join(POOLS)}")
    return find_pooler(model)(model, images, pool)


__all__ = ["POOLS", "find_pooler", "pooled_features", "register_pooler"]
