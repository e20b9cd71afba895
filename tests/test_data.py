import os

import numpy as np
import pytest
import torch

from mim_lightning.data import ClassFolderSource, DemoSource, ImageFolderSource
from mim_lightning.data.sampler import EpochIndexSampler
from mim_lightning.errors import ConfigError
from mim_lightning.masking import RandomMask

from conftest import make_datamodule, write_images


def make_dm(source, **kwargs):
    return make_datamodule(source, **{"batch_size": 4, "val_fraction": 0.1, **kwargs})


def test_folder_source_is_recursive_and_skips_non_images(image_folder):
    samples = ImageFolderSource(str(image_folder)).samples()
    assert len(samples) == 24
    assert any(os.sep + "deeper" + os.sep in s.path for s in samples)
    assert all(s.label == -1 for s in samples)


def test_class_folder_keeps_labels(class_folder):
    source = ClassFolderSource(str(class_folder))
    samples = source.samples()
    assert source.classes == ["cat", "dog", "emu"]
    assert sorted({s.label for s in samples}) == [0, 1, 2]
    dm = make_dm(source)
    item = dm.train_dataset[(0, 0)]
    assert item["label"] in (0, 1, 2)


def test_batch_has_images_and_masks(image_folder):
    dm = make_dm(ImageFolderSource(str(image_folder)))
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32)
    assert batch["mask"].shape == (4, 4, 4) and batch["mask"].dtype == torch.bool
    assert torch.all(batch["mask"].flatten(1).sum(1) == 12)
    assert "label" not in batch


def test_train_val_split_is_disjoint_and_deterministic(image_folder):
    a = make_dm(ImageFolderSource(str(image_folder)))
    b = make_dm(ImageFolderSource(str(image_folder)))
    val = {s.path for s in a.val_dataset.samples}
    assert len(val) == 8 and val == {s.path for s in b.val_dataset.samples}  # data.val_min_images (24 x 0.1 = 2)
    assert not val & {s.path for s in a.train_dataset.samples}


def test_samples_are_seeded_per_index_and_epoch(image_folder):
    dm = make_dm(ImageFolderSource(str(image_folder)))
    ds = dm.train_dataset
    a, b = ds[(3, 0)], ds[(3, 0)]
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["mask"], b["mask"])
    c = ds[(3, 1)]
    assert not torch.equal(a["mask"], c["mask"]) or not torch.equal(a["images"], c["images"])
    # the global RNG is untouched by the per-sample seeding
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    ds[(4, 0)]
    assert torch.equal(torch.rand(1), expected)


def test_worker_count_does_not_change_the_data(image_folder):
    batches = []
    for workers in (0, 2):
        dm = make_dm(ImageFolderSource(str(image_folder)), num_workers=workers, persistent_workers=False)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        batches.append(next(iter(loader)))
    assert torch.equal(batches[0]["images"], batches[1]["images"])
    assert torch.equal(batches[0]["mask"], batches[1]["mask"])


def test_sampler_shards_ranks_disjointly_and_reshuffles_per_epoch():
    shards = [EpochIndexSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    keys = [list(s) for s in shards]
    indices = [k[0] for shard in keys for k in shard]
    assert sorted(indices) == list(range(10))
    assert all(epoch == 0 for shard in keys for _, epoch in shard)
    shards[0].set_epoch(1)
    assert [k[0] for k in shards[0]] != [k[0] for k in keys[0]]
    assert all(epoch == 1 for _, epoch in shards[0])


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "mixed"
    write_images(root, 10)
    (root / "broken.png").write_bytes(b"not a png at all")
    (root / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping unreadable image"):  # the setup probe finds them first
        dm = make_dm(ImageFolderSource(str(root)), val_fraction=0.0)
        items = [dm.train_dataset[(i, 0)] for i in range(len(dm.train_dataset))]
    assert all(item["images"].shape == (3, 32, 32) for item in items)
    assert dm.num_skipped() == 2


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    from PIL import Image

    root = tmp_path / "modes"
    root.mkdir()
    Image.fromarray(np.full((40, 40), 128, np.uint8), mode="L").save(root / "gray.png")
    Image.fromarray(np.full((40, 40, 4), 200, np.uint8), mode="RGBA").save(root / "rgba.png")
    dm = make_dm(ImageFolderSource(str(root)), val_fraction=0.0, batch_size=2)
    assert dm.train_dataset[(0, 0)]["images"].shape == (3, 32, 32)
    assert dm.train_dataset[(1, 0)]["images"].shape == (3, 32, 32)


def test_missing_and_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root='.*nowhere'.*no such folder"):
        ImageFolderSource(str(tmp_path / "nowhere")).samples()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data\.root=.*no images found"):
        ImageFolderSource(str(tmp_path / "empty")).samples()
    with pytest.raises(ConfigError, match=r"data\.root=None"):
        ImageFolderSource(None).samples()


def test_batch_larger_than_the_dataset_is_rejected(image_folder):
    with pytest.raises(ConfigError, match=r"data\.batch_size=64"):
        make_dm(ImageFolderSource(str(image_folder)), batch_size=64)


def test_demo_source_writes_real_photos_once(tmp_path):
    source = DemoSource(str(tmp_path / "demo"))
    samples = source.samples()
    assert len(samples) == 17
    mtimes = {s.path: os.path.getmtime(s.path) for s in samples}
    assert [s.path for s in DemoSource(str(tmp_path / "demo")).samples()] == list(mtimes)
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())
    from PIL import Image

    with Image.open(samples[0].path) as image:
        assert image.mode == "RGB" and max(image.size) <= 256


def test_per_batch_mask_generator_gives_one_mask_per_batch(image_folder):
    dm = make_dm(ImageFolderSource(str(image_folder)), mask_generator=RandomMask(32, 16, 0.5, per_batch=True))
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[0] == 4 and batch["mask"].shape == (1, 2, 2)


def test_16_bit_cmyk_and_transparent_palette_images_become_8_bit_rgb(tmp_path):
    from PIL import Image

    from mim_lightning.data.datasets import load_rgb

    ramp = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)  # up to 63960
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] * 128)
    palette.save(tmp_path / "palette.png", transparency=0)
    deep = np.asarray(load_rgb(str(tmp_path / "deep.png")))
    assert deep.dtype == np.uint8 and deep.shape == (40, 40, 3)
    assert deep.max() > 240 and deep.min() == 0  # scaled, not clipped to white
    assert np.asarray(load_rgb(str(tmp_path / "cmyk.jpg"))).shape == (40, 40, 3)
    assert np.asarray(load_rgb(str(tmp_path / "palette.png")))[0, 0].tolist() == [255, 0, 0]


def test_color_jitter_changes_colours_and_is_validated(image_folder):
    plain = make_dm(ImageFolderSource(str(image_folder)))
    jittered = make_dm(ImageFolderSource(str(image_folder)), color_jitter=0.4)
    a, b = plain.train_dataset[(0, 0)]["images"], jittered.train_dataset[(0, 0)]["images"]
    assert a.shape == b.shape and not torch.equal(a, b)
    with pytest.raises(ConfigError, match="data.color_jitter=-1"):
        make_dm(ImageFolderSource(str(image_folder)), color_jitter=-1)
