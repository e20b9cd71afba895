"""Validation that means something: held-out size and stratification, unreadable held-out and training files,
all-unreadable folders, loader-worker hygiene, top-k only where it can miss, run summaries (describe())."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mim_lightning import compose
from mim_lightning.data import ClassFolderSource, ImageFolderSource, PretrainDataModule
from mim_lightning.data.split import held_out_count, split_train_val
from mim_lightning.data.sources import Sample
from mim_lightning.errors import ConfigError

from conftest import REPO, make_datamodule, tiny_overrides, write_images

DESCRIBE_KEYS = {"source", "demo", "images", "train", "val", "classes", "skipped", "repeat"}
FT_TINY = ["backbone=vit_test", "data.image_size=32", "data.batch_size=4", "data.num_workers=0", "trainer=cpu",
           "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "trainer.log_every_n_steps=1"]


def make_dm(source, **kwargs) -> PretrainDataModule:
    return make_datamodule(source, **{"batch_size": 2, "val_fraction": 0.01, **kwargs})


def classes(root: Path, names: list[str], per_class: int) -> Path:
    for label, name in enumerate(names):
        write_images(root / name, per_class, size=40, seed=20 + label, prefix=name)
    return root


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as stream:
        return list(csv.DictReader(stream))


# --------------------------------------------------------------------------- how many are held out


def test_held_out_count_has_a_minimum_capped_at_half_the_images():
    assert held_out_count(20, 0.01, 8, 1000) == 8  # 1% would be 0.2 images
    assert held_out_count(10, 0.01, 8, 1000) == 5  # capped: training keeps at least half
    assert held_out_count(3, 0.01, 8, 1000) == 1
    assert held_out_count(1, 0.01, 8, 1000) == 0
    assert held_out_count(5000, 0.01, 8, 1000) == 50
    assert held_out_count(10 ** 6, 0.01, 8, 1000) == 1000  # val_max_images caps
    assert held_out_count(20, 0.0, 8, 1000) == 0  # val_fraction 0: no validation
    assert held_out_count(20, 0.01, 0, 1000) == 1  # the old minimum
    with pytest.raises(ConfigError, match="data.val_min_images=-1"):
        held_out_count(20, 0.01, -1, 1000)


def test_folder_of_20_holds_out_8_and_of_10_holds_out_5(tmp_path):
    write_images(tmp_path / "twenty", 20, size=40)
    write_images(tmp_path / "ten", 10, size=40)
    twenty = make_dm(ImageFolderSource(str(tmp_path / "twenty")))
    ten = make_dm(ImageFolderSource(str(tmp_path / "ten")))
    assert len(twenty.val_dataset.samples) == 8 and len(twenty.train_dataset.samples) == 12
    assert len(ten.val_dataset.samples) == 5 and len(ten.train_dataset.samples) == 5
    with pytest.raises(ConfigError, match="data.val_min_images"):
        PretrainDataModule(ImageFolderSource(str(tmp_path / "ten")), val_min_images=-2)


def test_labelled_split_is_stratified_and_keeps_every_class_in_training():
    samples = [Sample(f"{c}/{i}", c) for c in range(3) for i in range(6)]
    train, val = split_train_val(samples, 0.2, 1000, seed=0, val_min=8)
    assert len(val) == 8
    assert sorted(Counter(s.label for s in val).values()) == [2, 3, 3]
    assert split_train_val(samples, 0.2, 1000, seed=0, val_min=8) == (train, val)
    # imbalanced: shares follow class sizes, and a one-image class stays in training
    samples = [Sample(f"a{i}", 0) for i in range(40)] + [Sample(f"b{i}", 1) for i in range(10)] + [Sample("c", 2)]
    train, val = split_train_val(samples, 0.2, 1000, seed=3, val_min=8)
    counts = Counter(s.label for s in val)
    assert len(val) == 10 and counts[0] == 8 and counts[1] == 2 and counts[2] == 0
    assert {s.label for s in train} == {0, 1, 2}


# --------------------------------------------------------------------------- unreadable files


def test_an_unreadable_held_out_image_is_replaced_marked_and_counted(tmp_path):
    root = tmp_path / "images"
    write_images(root, 20, size=40)
    val_paths = sorted(s.path for s in make_dm(ImageFolderSource(str(root))).val_dataset.samples)
    Path(val_paths[-1]).write_bytes(b"broken")
    dm = make_dm(ImageFolderSource(str(root)))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = list(dm.val_dataloader())
    valid = torch.cat([b["valid"] for b in batches])
    assert len(valid) == 8 and int((~valid).sum()) == 1
    assert dm.num_skipped() == 1 and dm.describe()["skipped"] == 1


def test_a_held_out_set_none_of_which_reads_turns_validation_off(tmp_path, caplog):
    root = tmp_path / "images"
    write_images(root, 20, size=40)
    for sample in make_dm(ImageFolderSource(str(root))).val_dataset.samples:
        Path(sample.path).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="mim_lightning"):
        dm = make_dm(ImageFolderSource(str(root)))
    assert dm.val_dataset is None and dm.val_dataloader() == []
    assert "validation is off" in caplog.text


def test_pretraining_with_an_unreadable_held_out_image_validates_and_checkpoints(tmp_path):
    from mim_lightning import pretrain

    root = tmp_path / "images"
    write_images(root, 20, size=40)
    val = make_dm(ImageFolderSource(str(root))).val_dataset.samples
    Path(val[0].path).write_bytes(b"not an image")
    run_dir = tmp_path / "run"
    trainer = pretrain(compose("pretrain", tiny_overrides(run_dir, "experiment=null", "data=folder", f"data.root={root}",
                                                          "~callbacks.reconstructions", "trainer.max_epochs=1")))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    losses = [float(r["val/loss"]) for r in metrics(run_dir) if r.get("val/loss")]
    assert losses and all(v == v for v in losses)  # finite, not NaN
    assert trainer.datamodule.num_skipped() == 1


def test_a_folder_with_no_readable_image_is_one_line(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(5):
        (root / f"x{i}.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ConfigError) as info:
        make_dm(ImageFolderSource(str(root)))
    text = str(info.value)
    assert text.startswith("data.root=") and "no readable images: all 5 files failed to decode" in text
    assert "\n" not in text
    for i in range(5, 90):
        (root / f"x{i:02d}.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="all 90 files failed to decode"):  # read through, not a guess after 64
        make_dm(ImageFolderSource(str(root)))


def test_a_folder_with_no_readable_image_through_the_cli_is_exit_2_one_line(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(4):
        (root / f"x{i}.png").write_bytes(b"garbage")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "mim_lightning.train", "experiment=null", "data=folder",
                             f"data.root={root}", "trainer=cpu", "backbone=vit_test", "data.image_size=32",
                             "data.num_workers=0", f"run_dir={tmp_path / 'run'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mim_lightning: error: data.root="), result.stderr[-2000:]
    assert "no readable images: all 4 files failed to decode" in lines[0]


def test_an_unreadable_file_is_warned_once_per_run_not_per_worker(tmp_path, monkeypatch):
    warned = tmp_path / "warned.txt"  # loader workers are processes: record their warnings in a file

    def record(message, *args, **kwargs):
        with open(warned, "a") as stream:
            stream.write(f"{message}\n")

    monkeypatch.setattr("mim_lightning.data.datasets.warnings.warn", record)
    root = tmp_path / "images"
    write_images(root, 16, size=40)
    (root / "zz_broken.png").write_bytes(b"broken")  # sorted last: the setup probe reads img_000 and stops
    dm = make_dm(ImageFolderSource(str(root)), val_fraction=0.0, num_workers=2, persistent_workers=False, repeat=2)
    loader = dm.train_dataloader()
    for epoch in range(2):  # new worker processes each epoch
        loader.sampler.set_epoch(epoch)
        for _ in loader:
            pass
    lines = warned.read_text().splitlines()
    assert len(lines) == 1 and "zz_broken.png" in lines[0], lines
    assert dm.num_skipped() == 1


# --------------------------------------------------------------------------- finetuning


def test_finetune_reports_what_it_loaded_skips_top5_with_3_classes_and_prints_the_best(tmp_path, caplog):
    from mim_lightning import finetune, pretrain

    root = classes(tmp_path / "classes", ["cat", "dog", "emu"], 6)
    pre_dir = tmp_path / "pre"
    pretrain(compose("pretrain", tiny_overrides(pre_dir, "experiment=null", "data=imagefolder", f"data.root={root}",
                                                "~callbacks.reconstructions", "trainer.max_steps=1")))
    ckpt = pre_dir / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "ft"
    with caplog.at_level(logging.INFO, logger="mim_lightning"):
        trainer = finetune(compose("finetune", [*FT_TINY, f"data.root={root}", f"pretrained={ckpt}",
                                                "data.image_size=48", "trainer.max_epochs=2", f"run_dir={run_dir}"]))
    lines = [r.getMessage() for r in caplog.records if r.name == "mim_lightning"]
    loaded = [line for line in lines if line.startswith("pretrained=")]
    assert len(loaded) == 1, lines
    assert "tensors loaded" in loaded[0] and "pos_embed 4x4 -> 6x6" in loaded[0]
    assert "4 missing, initialised (fc_norm, head)" in loaded[0] and "2 unexpected, ignored (norm)" in loaded[0]
    best = [line for line in lines if "val_top1 final" in line]
    assert len(best) == 1 and "best" in best[0], lines
    assert trainer.lightning_module.top5 is None
    rows = metrics(run_dir)
    assert "finetune/val_top5" not in rows[0] and any(r.get("finetune/val_top1") for r in rows)
    assert trainer.datamodule.describe()["val"] == 8  # 18 images: 8 held out (3 + 3 + 2)


def test_finetune_logs_top5_with_6_classes_and_scores_only_readable_held_out_images(tmp_path):
    from mim_lightning import build_finetune_datamodule, finetune

    root = classes(tmp_path / "classes", [f"c{i}" for i in range(6)], 4)
    cfg = compose("finetune", [*FT_TINY, f"data.root={root}", "trainer.max_epochs=1", f"run_dir={tmp_path / 'ft'}"])
    held_out = build_finetune_datamodule(cfg)
    held_out.setup("fit")
    assert len(held_out.val_dataset.samples) == 8
    Path(held_out.val_dataset.samples[1].path).write_bytes(b"")
    trainer = finetune(cfg)
    assert trainer.lightning_module.top5 is not None
    assert trainer.datamodule.num_skipped() == 1
    rows = metrics(tmp_path / "ft")
    assert any(r.get("finetune/val_top5") for r in rows)
    # 7 readable held-out images were scored: top-1 is a multiple of 1/7
    top1 = [float(r["finetune/val_top1"]) for r in rows if r.get("finetune/val_top1")]
    assert top1 and all(abs(v * 7 - round(v * 7)) < 1e-4 for v in top1)


# --------------------------------------------------------------------------- describe()


def test_describe_folder_imagefolder_and_demo(tmp_path, image_folder, class_folder):
    folder = make_dm(ImageFolderSource(str(image_folder))).describe()
    assert set(folder) == DESCRIBE_KEYS
    assert folder == {"source": f"folder {image_folder}", "demo": False, "images": 24, "train": 16, "val": 8,
                      "classes": 0, "skipped": 0, "repeat": 1}
    labelled = make_dm(ClassFolderSource(str(class_folder)), repeat=3).describe()
    assert labelled["source"] == f"class folders {class_folder}" and labelled["classes"] == 3
    assert (labelled["images"], labelled["train"], labelled["val"], labelled["repeat"]) == (18, 10, 8, 3)
    from mim_lightning.api import build_datamodule

    module = build_datamodule(compose("pretrain", ["experiment=null", "data=demo", "data.num_workers=0",
                                                   "data.batch_size=4"]))
    module.setup("fit")
    demo = module.describe()
    assert demo["demo"] is True and demo["source"] == "demo photos (17 images from scikit-image)"
    assert (demo["images"], demo["train"], demo["val"], demo["classes"]) == (17, 13, 4, 0)  # conf/data/demo.yaml


def test_describe_shards_and_hf(tmp_path):
    from mim_lightning.data import ShardSource

    shards = PretrainDataModule(ShardSource(urls=None, cache_dir=str(tmp_path / "shards")), image_size=32,
                                batch_size=2, num_workers=0)
    shards.setup("fit")
    info = shards.describe()
    assert set(info) == DESCRIBE_KEYS and info["demo"] is True and info["source"].startswith("demo photos as shards")
    assert (info["images"], info["train"], info["val"], info["classes"]) == (17, 9, 8, 0)  # the folder split rule
    pytest.importorskip("datasets")
    from mim_lightning.data.hf import HFSource

    hf = PretrainDataModule(HFSource(path=None, cache_dir=str(tmp_path / "hf")), image_size=32, batch_size=2,
                            num_workers=0, val_fraction=0.1)
    hf.setup("fit")
    info = hf.describe()
    assert set(info) == DESCRIBE_KEYS and info["demo"] is True and info["source"].startswith("demo photos")
    assert (info["images"], info["train"], info["val"]) == (17, 9, 8)


def test_data_skipped_is_the_total_over_two_ddp_ranks(tmp_path):
    """Each rank meets only some unreadable files; data/skipped is their union (not one rank's, not the mean)."""
    root = tmp_path / "images"
    write_images(root, 24, size=40)
    for name in ("img_004.png", "img_017.png"):  # read by rank 0 and rank 1 (seed 0)
        (root / name).write_bytes(b"broken")
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(run_dir) if not o.startswith(("data.repeat", "data.batch_size"))]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mim_lightning.train", "experiment=null", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", "trainer.precision=32-true", *overrides, "data=folder", f"data.root={root}",
         "data.val_fraction=0", "data.batch_size=2", "data.repeat=1", "~callbacks.reconstructions"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    skipped = [float(r["data/skipped"]) for r in metrics(run_dir) if r.get("data/skipped")]
    assert skipped == [2.0]
