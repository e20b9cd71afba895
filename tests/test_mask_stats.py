import csv
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
    assert small["mask/applied_ratio"] == pytest.approx(large["mask/applied_ratio"], abs=0.02)
    assert large["mask/avg_dist"] > 2 * small["mask/avg_dist"]


def test_mask_statistics_report_the_configured_and_the_applied_ratio():
    stats = mask_statistics(RandomMask(224, 16, 0.7), samples=4)
    assert stats["mask/config_ratio"] == 0.7
    assert stats["mask/applied_ratio"] == pytest.approx((196 - int(196 * 0.3)) / 196)  # 138 of 196
    # SimMIM at 64px: ceil(0.6 * 4) = 3 of the 4 32px units are hidden
    simmim = mask_statistics(SimMIMMask(64, 8, 0.6, unit=32), samples=4)
    assert simmim["mask/config_ratio"] == 0.6 and simmim["mask/applied_ratio"] == 0.75


@pytest.mark.parametrize("mask", ["mask=simmim", "mask=null"])
def test_simmim_run_logs_the_configured_and_the_applied_ratio(tmp_path, mask):
    from conftest import tiny_overrides
    from mim_lightning import compose, pretrain

    run_dir = tmp_path / "run"
    pretrain(compose("pretrain", tiny_overrides(run_dir, "experiment=null", "method=simmim", "data.image_size=64",
                                                "trainer.max_steps=2", mask)))
    with open(run_dir / "csv" / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))

    def logged(key):
        return [float(r[key]) for r in rows if r.get(key)]

    # the mask comes from the data (mask=simmim) or, with mask=null, from the model's own SimMIM generator
    assert logged("mask/config_ratio") == [0.6] and logged("mask/applied_ratio") == [0.75]
    assert logged("mask/avg_dist")[0] > 0
    assert logged("mask/ratio") == ([0.75, 0.75] if mask == "mask=simmim" else [])  # measured in each batch
