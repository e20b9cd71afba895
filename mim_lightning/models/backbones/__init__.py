"""Encoders built from the sizes in ``conf/backbone/*.yaml``; each method turns sizes into its encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mim_lightning.errors import ConfigError


def require_family(backbone: Mapping[str, Any], allowed: tuple[str, ...], method: str) -> None:
    """Fail at build time, in one line, when ``method`` cannot use the backbone's family."""
    family = backbone.get("family")
    if family not in allowed:
        names = ", ".join(f"{f}_*" for f in allowed)
        raise ConfigError("backbone", backbone.get("name", family), f"{names} backbones for {method}",
                          f"{method} does not support the '{family}' family")


def check_heads(dim: int, heads: int, key: str) -> None:
    if heads <= 0 or dim % heads or dim % 4:
        raise ConfigError(key, heads, f"a head count dividing the width {dim} (width divisible by 4)")
