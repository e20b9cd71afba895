"""Pooled encoder features of any pretraining model, for kNN and linear probes: the encoder protocol.

``pooled_features(model, images) -> (B, D)`` runs only the model's *encoder* on the whole, unmasked image and
pools its output tokens into one vector per image. Every method's model implements it as
``model.pooled_features(images, pool)`` (``pool="mean"``: mean over the patch tokens; ``pool="cls"``: the cls token,
for encoders that have one), using :func:`pool_cls_tokens` / :func:`pool_tokens`. A model class that cannot be
edited gets a function with :func:`register_pooler`. The features are those of the model's current mode; the
probes call this under ``torch.no_grad()`` with the model in eval mode (no drop path).
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


def pool_cls_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1 + L, D) tokens with cls first -> (B, D): cls, or the mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


def pool_tokens(tokens: torch.Tensor, pool: str, what: str) -> torch.Tensor:
    """(B, ..., D) tokens without cls -> mean over every token axis (B, D)."""
    if pool == "cls":
        raise ValueError(f"pool='cls': the {what} encoder has no cls token; use pool='mean'")
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).mean(dim=1)


def find_pooler(model: nn.Module) -> Pooler:
    """The pooling function for ``model``'s class (nearest registered base class first)."""
    if hasattr(model, "pooled_features"):
        return lambda m, images, pool: m.pooled_features(images, pool)
    for cls in type(model).__mro__:
        if cls in _POOLERS:
            return _POOLERS[cls]
    names = ", ".join(sorted(c.__name__ for c in _POOLERS)) or "none registered"
    raise TypeError(f"pooled_features: no feature pooling for {type(model).__name__} (known: {names}); "
                    "give the model a pooled_features(images, pool) method or call register_pooler")


def pooled_features(model: nn.Module, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """Encoder features of the unmasked ``images`` (B, 3, H, W), pooled to (B, D); see the module docstring."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}: expected one of {', '.join(POOLS)}")
    return find_pooler(model)(model, images, pool)


__all__ = ["POOLS", "find_pooler", "pool_cls_tokens", "pool_tokens", "pooled_features", "register_pooler"]
