"""The held-out split of an indexed source: how many images are held out and which ones (seeded,
class-stratified for labelled samples), the same for every source and on every rank."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mim_lightning.data.sources import Sample
from mim_lightning.errors import ConfigError


def held_out_count(count: int, val_fraction: float, val_min: int, val_max: int) -> int:
    """How many of ``count`` images are held out: ``round(count * val_fraction)``, raised to ``val_min``
    (and to 1), then capped by ``val_max`` and by half the images (training keeps at least half);
    0 when ``val_fraction`` is 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("data.val_fraction", val_fraction, "a number in [0, 1), e.g. 0.01 (0: no validation)")
    if int(val_min) < 0:
        raise ConfigError("data.val_min_images", val_min, "0 or more (e.g. 8)")
    if int(val_max) < 0:
        raise ConfigError("data.val_max_images", val_max, "0 or more (e.g. 1000)")
    if val_fraction == 0 or count < 2:
        return 0
    wanted = max(int(round(count * val_fraction)), int(val_min), 1)
    return min(wanted, int(val_max), count // 2)


def split_train_val(samples: Sequence[Sample], val_fraction: float, val_max: int, seed: int,
                    val_min: int = 0) -> tuple[list[Sample], list[Sample]]:
    """A seeded, deterministic split holding out :func:`held_out_count` samples, in list order.

    Unlabelled samples: a seeded random subset. Labelled ones (``label >= 0``): class-stratified, each
    class giving its share (proportional to its size, ties broken by the seed) and keeping at least one
    training image."""
    count = len(samples)
    num_val = held_out_count(count, val_fraction, val_min, val_max)
    rng = np.random.default_rng(seed)
    labels = np.asarray([s.label for s in samples], dtype=np.int64)
    if num_val == 0:
        val_ids: set[int] = set()
    elif (labels < 0).any():
        val_ids = set(rng.permutation(count)[:num_val].tolist())
    else:
        # Systematic allocation: the j-th of a class's n (seeded order) has key (j + 0.5) / n; the smallest
        # keys are held out, so every class gives about num_val * n / count. A class's last image stays.
        keys = np.full(count, np.inf)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            members = members[rng.permutation(len(members))]
            keys[members[:-1]] = (np.arange(len(members) - 1) + 0.5) / len(members)
        chosen = np.lexsort((rng.random(count), keys))[:num_val]
        val_ids = {int(i) for i in chosen if np.isfinite(keys[i])}
    train = [s for i, s in enumerate(samples) if i not in val_ids]
    val = [s for i, s in enumerate(samples) if i in val_ids]
    return train, val
