import numpy as np
import pytest
import torch

from mim_lightning.errors import ConfigError
from mim_lightning.masking import BlockMask, RandomMask, SimMIMMask, random_mask


@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.75, 0.9])
def test_random_mask_keeps_int_length_times_one_minus_ratio(ratio):
    gen = RandomMask(224, 16, ratio)
    mask = gen(np.random.default_rng(0))
    assert mask.shape == (14, 14) and mask.dtype == bool
    assert (~mask).sum() == int(196 * (1 - ratio))  # MAE's len_keep


def test_mae_default_hides_147_of_196():
    assert RandomMask(224, 16, 0.75)(np.random.default_rng(1)).sum() == 147


def test_simmim_mask_is_unit_aligned_with_ceil_count():
    gen = SimMIMMask(192, 4, 0.6, unit=32)
    mask = gen(np.random.default_rng(0))
    assert mask.shape == (48, 48)
    units = mask.reshape(6, 8, 6, 8)
    # every 8x8 block of 4px patches (one 32px unit) is all hidden or all visible
    assert np.all(units.all(axis=(1, 3)) | ~units.any(axis=(1, 3)))
    assert units.all(axis=(1, 3)).sum() == int(np.ceil(36 * 0.6))


def test_simmim_vit_grid():
    mask = SimMIMMask(224, 16, 0.6, unit=32)(np.random.default_rng(0))
    assert mask.shape == (14, 14)
    assert mask.sum() == int(np.ceil(49 * 0.6)) * 4


@pytest.mark.parametrize("cls,kwargs", [(RandomMask, {}), (SimMIMMask, {"unit": 16}), (BlockMask, {})])
def test_generators_are_seeded(cls, kwargs):
    gen = cls(64, 8, 0.5, **kwargs)
    a = gen(np.random.default_rng(123))
    b = gen(np.random.default_rng(123))
    c = gen(np.random.default_rng(124))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("seed", range(20))
def test_block_mask_has_exact_count_and_blocks(seed):
    gen = BlockMask(224, 16, 75 / 196)
    mask = gen(np.random.default_rng(seed))
    assert mask.sum() == 75
    assert mask.shape == (14, 14)


def test_block_mask_is_blockier_than_random():
    rng = np.random.default_rng(0)

    def neighbours(mask):
        return (mask[1:] & mask[:-1]).sum() + (mask[:, 1:] & mask[:, :-1]).sum()

    block = np.mean([neighbours(BlockMask(224, 16, 0.4)(rng)) for _ in range(20)])
    rand = np.mean([neighbours(RandomMask(224, 16, 0.4)(rng)) for _ in range(20)])
    assert block > 1.5 * rand


def test_torch_random_mask_matches_count_and_varies_per_sample():
    torch.manual_seed(0)
    mask = random_mask(8, (14, 14), 0.75)
    assert mask.shape == (8, 14, 14) and mask.dtype == torch.bool
    assert torch.all(mask.flatten(1).sum(1) == 147)
    assert not torch.equal(mask[0], mask[1])


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, "x"])
def test_ratio_outside_open_interval_is_rejected(ratio):
    with pytest.raises(ConfigError, match=r"mask\.ratio"):
        RandomMask(224, 16, ratio)


def test_unit_not_multiple_of_patch_is_rejected():
    with pytest.raises(ConfigError, match=r"mask\.unit=24.*multiple of the model patch size 16"):
        SimMIMMask(192, 16, 0.6, unit=24)


def test_image_size_not_divisible_by_patch_is_rejected():
    with pytest.raises(ConfigError, match=r"data\.image_size=100.*backbone\.patch_size=16"):
        RandomMask(100, 16, 0.75)


def test_image_size_not_divisible_by_unit_is_rejected():
    with pytest.raises(ConfigError, match=r"data\.image_size=224.*mask\.unit=64"):
        SimMIMMask(224, 16, 0.6, unit=64)


def test_ratio_that_leaves_nothing_visible_is_rejected():
    RandomMask(16, 8, 0.5)  # 4 units, 2 hidden: fine
    with pytest.raises(ConfigError, match="hides 4 of 4 units"):
        RandomMask(16, 8, 0.9)  # keeps int(4 * 0.1) = 0
