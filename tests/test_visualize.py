import numpy as np
import pytest
import torch

from mim_lightning.visualize import (MIXING_TITLES, RECONSTRUCTION_TITLES, denormalize, mixing_panels, panels_to_grid,
                                     reconstruction_panels, titled_grid, upscale)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalized(images):
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_panels_range_masking_and_paste_back():
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 16, 16)
    images, pred = normalized(pixels), normalized(torch.rand(2, 3, 16, 16))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True  # top half hidden
    panels = reconstruction_panels(images, pred, mask, MEAN, STD)
    assert panels.shape == (2, 4, 3, 16, 16)
    assert panels.min() >= 0 and panels.max() <= 1
    original, masked, prediction, pasted = panels.unbind(1)
    torch.testing.assert_close(original, pixels)
    assert torch.all(masked[:, :, :8] == 0.5) and torch.equal(masked[:, :, 8:], original[:, :, 8:])
    torch.testing.assert_close(prediction, denormalize(pred, MEAN, STD))
    assert torch.equal(pasted[:, :, 8:], original[:, :, 8:])  # visible pixels are the input's
    assert torch.equal(pasted[:, :, :8], prediction[:, :, :8])


def test_mixing_panels_show_both_mixes_of_a_pair():
    pixels = torch.rand(4, 3, 8, 8)
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = True
    panels = mixing_panels(normalized(pixels), normalized(pixels), mask, MEAN, STD)
    assert panels.shape == (4, 3, 3, 8, 8)
    # rows in pair order 0, 3, 1, 2; the mixed image of sample 0 takes sample 3's top-left quarter
    torch.testing.assert_close(panels[0, 1, :, :4, :4], pixels[3, :, :4, :4])
    torch.testing.assert_close(panels[0, 1, :, 4:, :], pixels[0, :, 4:, :])
    torch.testing.assert_close(panels[1, 1, :, :4, :4], pixels[0, :, :4, :4])


def test_grid_layout():
    grid = panels_to_grid(torch.rand(3, 4, 3, 10, 12), pad=2)
    assert grid.shape == (3 * 12, 4 * 14, 3) and grid.dtype.name == "uint8"


def band_height(grid: np.ndarray) -> int:
    """Rows above the first tile row (the title band); tiles start where a row stops being mostly white."""
    return int(np.argmax((grid < 250).any(-1).mean(1) > 0.5))


def test_titled_grid_upscales_small_tiles_with_nearest_neighbour_and_draws_titles():
    panels = torch.rand(2, 4, 3, 32, 32)
    grid = titled_grid(panels, RECONSTRUCTION_TITLES, min_tile=128, pad=2)
    band = grid.shape[0] - 2 * 130
    assert grid.shape == (band + 2 * 130, 4 * 130, 3) and grid.dtype == np.uint8 and band > 8
    assert band_height(grid) == band
    for column in range(4):  # dark text in every column's part of the band
        assert (grid[:band, column * 130: column * 130 + 128] < 128).any()
    tiles = grid[band:]
    # each source pixel is a 4x4 block of the tile: nearest neighbour, no smoothing
    expected = (panels[1, 2].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(tiles[130: 130 + 128: 4, 260: 260 + 128: 4], expected)
    np.testing.assert_array_equal(tiles[133: 133 + 128: 4, 263: 263 + 128: 4], expected)


def test_large_tiles_keep_their_size_and_titles_must_match_the_panels():
    panels = torch.rand(1, 3, 3, 160, 144)
    assert upscale(panels, 128) is panels
    grid = titled_grid(panels, MIXING_TITLES)
    assert grid.shape[1] == 3 * 146 and grid.shape[0] > 162
    assert upscale(torch.rand(1, 1, 3, 48, 64), 128).shape[-2:] == (144, 192)
    with pytest.raises(ValueError, match="3 titles for 4 panels"):
        titled_grid(torch.rand(1, 4, 3, 8, 8), MIXING_TITLES)


def test_a_small_held_out_split_is_topped_up_from_the_training_set(tmp_path):
    from PIL import Image

    from conftest import tiny_overrides, write_images
    from mim_lightning import compose, pretrain

    folder = tmp_path / "images"
    write_images(folder, 12)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, "experiment=null", "data=folder", f"data.root={folder}",
                               "data.val_fraction=0.1", "data.val_min_images=0", "trainer.max_steps=1")
    trainer = pretrain(compose("pretrain", overrides))
    callback = next(c for c in trainer.callbacks if type(c).__name__ == "ReconstructionImages")
    assert callback.sources == ["val image 0", "train image 0", "train image 1", "train image 2"]
    with Image.open(sorted((run_dir / "reconstructions").glob("step_*.png"))[-1]) as png:
        grid = np.asarray(png.convert("RGB"))
    band = band_height(grid)
    assert band > 8 and grid.shape == (band + 4 * 130, 4 * 130, 3)  # 32px tiles shown at 128px
    # the training images come through the validation transform with fixed masks: the same every time
    again = callback._batch
    callback._batch = None
    torch.testing.assert_close(callback._fixed_batch(trainer)["images"], again["images"])
    assert torch.equal(callback._fixed_batch(trainer)["mask"], again["mask"])


def test_mixmae_run_writes_three_panel_grids(tmp_path, image_folder):
    from PIL import Image

    from conftest import tiny_overrides
    from mim_lightning import compose, pretrain

    run_dir = tmp_path / "mix"
    overrides = tiny_overrides(run_dir, "experiment=null", "method=mixmae", "backbone=swin_test", "data.image_size=64",
                               "data=folder", f"data.root={image_folder}", "data.val_fraction=0.2",
                               "trainer.max_steps=2")
    pretrain(compose("pretrain", overrides))
    png = sorted((run_dir / "reconstructions").glob("*.png"))[-1]
    with Image.open(png) as image:
        grid = np.asarray(image.convert("RGB"))
    band = band_height(grid)
    assert band > 8 and grid.shape == (band + 4 * 130, 3 * 130, 3)  # 64px tiles shown at 128px
