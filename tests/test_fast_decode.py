"""data.fast_decode: JPEGs decoded at a reduced DCT scale when the random crop allows it, the same crop boxes,
pixels close to a full decode; other images identical; undecodable files still skipped and counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mim_lightning import build_datamodule, compose
from mim_lightning.data import ImageFolderSource, PretrainDataModule
from mim_lightning.data.transforms import DraftRandomResizedCrop, draft_factor

from conftest import write_images


def photo_folder(root, count=6, size=(1600, 1200), ext="jpg"):
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size[1], 0:size[0]] / max(size)
    for i in range(count):
        image = np.stack([0.5 + 0.5 * np.sin(6.28 * (2 + i + c) * (xx + yy * (c + 1) / 3)) for c in range(3)], axis=-1)
        Image.fromarray((image * 255).astype(np.uint8)).save(root / f"p{i}.{ext}", quality=90)
    return root


def module(root, fast, **kwargs):
    dm = PretrainDataModule(ImageFolderSource(str(root)), image_size=64, batch_size=2, num_workers=0, val_fraction=0,
                            fast_decode=fast, **kwargs)
    dm.setup("fit")
    return dm


def test_draft_factor_keeps_the_crop_at_least_the_output_size():
    assert draft_factor(1200, 1600, 224, 224) == 4
    assert draft_factor(600, 800, 224, 224) == 2
    assert draft_factor(375, 500, 224, 224) == 1
    assert draft_factor(1800, 1800, 224, 224) == 8


def test_fast_decode_gives_the_same_crops_with_close_pixels(tmp_path):
    root = photo_folder(tmp_path / "photos")
    full, fast = module(root, False), module(root, True)
    assert fast.train_transform.lazy and not full.train_transform.lazy
    diffs = []
    for key in [(i, e) for i in range(6) for e in range(3)]:
        a, b = full.train_dataset[key], fast.train_dataset[key]
        assert a["images"].shape == b["images"].shape == (3, 64, 64)
        diffs.append((a["images"] - b["images"]).abs().mean().item() * 0.226)  # back to [0, 1] pixel units
    assert np.mean(diffs) < 0.02  # about 1-2 grey levels of 255 on average (docs/architecture.md, Data)


def test_fast_decode_leaves_png_identical_and_is_a_config_switch(tmp_path):
    root = tmp_path / "png"
    write_images(root, 4, size=300)
    full, fast = module(root, False), module(root, True)
    for key in [(0, 0), (3, 1)]:
        assert torch.equal(full.train_dataset[key]["images"], fast.train_dataset[key]["images"])
    cfg = compose("pretrain", ["data=folder", f"data.root={root}", "data.fast_decode=true", "data.image_size=32"])
    assert isinstance(build_datamodule(cfg).train_transform.image_transform.transforms[0], DraftRandomResizedCrop)


def test_an_undecodable_jpeg_is_skipped_and_counted_with_fast_decode(tmp_path):
    root = photo_folder(tmp_path / "photos", count=4)
    data = (root / "p1.jpg").read_bytes()
    (root / "p1.jpg").write_bytes(data[: len(data) // 3])  # truncated: the header opens, decoding fails
    Image.LOAD_TRUNCATED_IMAGES = False
    dm = module(root, True, repeat=1)
    with pytest.warns(UserWarning, match="unreadable image"):
        items = [dm.train_dataset[(i, 0)] for i in range(4)]
    assert all(item["images"].shape == (3, 64, 64) for item in items) and dm.num_skipped() == 1


def test_the_loader_table_measures_both_sizes_with_and_without_the_switch(tmp_path):
    from test_scripts import load_script

    benchmark = load_script("benchmark")
    rows = benchmark.loader_table(tmp_path, images=2, image_size=64, gpu_img_s=1000)
    assert [(r["jpeg"], r["fast_decode"]) for r in rows] == [("500x375", False), ("500x375", True),
                                                              ("1600x1200", False), ("1600x1200", True)]
    assert all(r["img_s_per_worker"] > 0 and r["workers_at_gpu"] >= 1 for r in rows)
    assert rows[-1]["speedup"] > 0 and rows[-1]["pixel_diff"] < 3
    assert "| 1600x1200 | true |" in benchmark.loader_markdown(rows, 1000)
