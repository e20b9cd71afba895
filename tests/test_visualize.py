import torch

from mim_lightning.visualize import denormalize, mixing_panels, panels_to_grid, reconstruction_panels

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


def test_mixmae_run_writes_three_panel_grids(tmp_path, image_folder):
    from PIL import Image

    from conftest import tiny_overrides
    from mim_lightning import compose, pretrain

    run_dir = tmp_path / "mix"
    overrides = tiny_overrides(run_dir, "method=mixmae", "backbone=swin_test", "data.image_size=64", "data=folder",
                               f"data.root={image_folder}", "data.val_fraction=0.2", "trainer.max_steps=2")
    pretrain(compose("pretrain", overrides))
    png = sorted((run_dir / "reconstructions").glob("*.png"))[-1]
    with Image.open(png) as grid:
        assert grid.size == (3 * 66, 4 * 66)
