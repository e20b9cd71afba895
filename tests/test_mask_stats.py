import itertools
import math

import numpy as np
import pytest

from mim_lightning.mask_stats import avg_dist, mask_statistics, pixel_mask
from mim_lightning.masking import RandomMask, SimMIMMask


def brute_force_avg_dist(mask, cell):
    pixels = pixel_mask(mask, cell)
    hidden = list(zip(*np.nonzero(pixels)))
    visible = list(zip(*np.nonzero(~pixels)))
    return float(np.mean([min(math.dist(h, v) for v in visible) for h in hidden]))


@pytest.mark.parametrize("seed,cell", itertools.product(range(5), [(1, 1), (2, 2), (4, 4)]))
def test_avg_dist_matches_brute_force(seed, cell):
    mask = np.random.default_rng(seed).random((5, 6)) < 0.6
    mask[0, 0], mask[-1, -1] = True, False
    assert avg_dist(mask, cell) == pytest.approx(brute_force_avg_dist(mask, cell))


def test_avg_dist_edge_cases():
    assert avg_dist(np.zeros((3, 3), bool)) == 0.0
    assert avg_dist(np.ones((3, 3), bool)) == math.inf
    one = np.zeros((3, 3), bool)
    one[1, 1] = True
    assert avg_dist(one, (1, 1)) == 1.0


def test_larger_units_give_larger_avg_dist_at_the_same_ratio():
    small = mask_statistics(SimMIMMask(192, 4, 0.6, unit=8), samples=16)
    large = mask_statistics(SimMIMMask(192, 4, 0.6, unit=32), samples=16)
    assert small["mask/ratio"] == pytest.approx(large["mask/ratio"], abs=0.02)
    assert large["mask/avg_dist"] > 2 * small["mask/avg_dist"]


def test_mask_statistics_ratio_is_the_applied_one():
    stats = mask_statistics(RandomMask(224, 16, 0.75), samples=4)
    assert stats["mask/ratio"] == pytest.approx(147 / 196)
