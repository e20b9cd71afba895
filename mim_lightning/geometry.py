"""Size checks shared by the encoders, the mask generators and the classifiers: image sizes as
``(height, width)`` pairs, divisibility by a patch or stride, and ratios in (0, 1), each failing with a
one-line :class:`~mim_lightning.errors.ConfigError` that names the config key."""

from __future__ import annotations

from collections.abc import Sequence

from mim_lightning.errors import ConfigError


def to_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``224 -> (224, 224)``; ``(192, 256)`` stays as it is."""
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def check_ratio(ratio: float, key: str = "mask.ratio") -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ConfigError(key, ratio, "a number strictly between 0 and 1, e.g. 0.75")
    return float(ratio)


def check_divisible(size: int | Sequence[int], divisor: int, key: str, divisor_name: str) -> tuple[int, int]:
    """Raise unless both sides of ``size`` are positive multiples of ``divisor``."""
    pair = to_pair(size)
    if divisor <= 0 or any(side <= 0 or side % divisor for side in pair):
        shown = pair[0] if pair[0] == pair[1] else pair
        raise ConfigError(key, shown, f"a multiple of {divisor_name}={divisor}", f"not divisible by {divisor}")
    return pair
