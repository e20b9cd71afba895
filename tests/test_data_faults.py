"""Faults in the data itself (issue #20): symlink loops, FIFOs, long runs of unreadable files, missing, truncated,
garbage and miscounted shards. Each must end in the right listing, a finished run, or one line naming the key;
never a hang (every risky part runs under a SIGALRM deadline or in a subprocess with a timeout)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mim_lightning import compose, pretrain
from mim_lightning.data import ImageFolderSource, PretrainDataModule, ShardSource
from mim_lightning.data.datasets import ImageDataset, NoReadableImagesError
from mim_lightning.data.shards import INDEX, resolve_shards, write_shards
from mim_lightning.data.sources import NotARegularFile, Sample, find_images
from mim_lightning.errors import ConfigError

from conftest import REPO, make_datamodule, tiny_overrides, write_images


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    def expired(_signum, _frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def make_dm(source, **kwargs) -> PretrainDataModule:
    return make_datamodule(source, **{"batch_size": 2, "val_fraction": 0.0, **kwargs})


def epoch(dm: PretrainDataModule) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sorted(i for batch in dm.train_dataloader() for i in batch["index"].tolist())


def warning_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mim_lightning" and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------ folder walk


def test_a_symlink_loop_lists_every_image_once(tmp_path, caplog):
    root = tmp_path / "images"
    write_images(root / "a", 6)
    write_images(root / "b", 4, prefix="b")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    with deadline(20), caplog.at_level(logging.WARNING, logger="mim_lightning"):
        paths = find_images(root)
        dm = make_dm(ImageFolderSource(str(root)), val_fraction=0.2, val_min_images=2)
    assert len(paths) == 10 and len({os.path.realpath(p) for p in paths}) == 10
    train = {os.path.realpath(s.path) for s in dm.train_dataset.samples}
    val = {os.path.realpath(s.path) for s in dm.val_dataset.samples}
    assert len(train) + len(val) == 10 and not train & val  # no held-out copies of training images
    assert any("symlink loop" in line and "loop" in line for line in warning_lines(caplog))


def test_two_symlinks_back_to_parent_folders_do_not_explode(tmp_path, caplog):
    root = tmp_path / "images"
    deep = root / "a" / "b"
    write_images(deep, 5)
    write_images(root, 3, prefix="top")
    (deep / "up1").symlink_to(root / "a", target_is_directory=True)
    (deep / "up2").symlink_to(root, target_is_directory=True)
    with deadline(20), caplog.at_level(logging.WARNING, logger="mim_lightning"):
        paths = find_images(root)
    assert len(paths) == 8 and len({os.path.realpath(p) for p in paths}) == 8
    assert any("2 symlink loop(s)" in line for line in warning_lines(caplog))


def test_plain_symlinked_subfolders_are_followed_without_a_word(tmp_path, caplog):
    outside = tmp_path / "elsewhere"
    write_images(outside, 4, prefix="x")
    root = tmp_path / "images"
    write_images(root / "real", 3)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "one.png").symlink_to(root / "real" / "img_000.png")  # a symlinked file is a file
    with deadline(20), caplog.at_level(logging.WARNING, logger="mim_lightning"):
        paths = find_images(root)
    assert len(paths) == 8 and sum("/linked/" in p for p in paths) == 4
    assert warning_lines(caplog) == []


def test_a_fifo_named_like_an_image_is_left_out_and_never_opened(tmp_path, caplog, one_thread):
    root = tmp_path / "images"
    write_images(root, 12)
    os.mkfifo(root / "pipe.jpg")
    (root / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    with deadline(20), caplog.at_level(logging.WARNING, logger="mim_lightning"):
        paths = find_images(root)
    assert len(paths) == 12 and not any(p.endswith(("pipe.jpg", "dangling.png")) for p in paths)
    assert any("a FIFO" in line and "pipe.jpg" in line and "dangling" in line for line in warning_lines(caplog))
    # A dataset handed the FIFO anyway (listed before it was made one) skips it rather than block on it.
    source = ImageFolderSource(str(root))
    with deadline(20):
        with pytest.raises(NotARegularFile, match="a FIFO"):
            source.open(Sample(str(root / "pipe.jpg")))
        dm = make_dm(source)
        dm.train_dataset = ImageDataset([Sample(str(root / "pipe.jpg"))] + dm.train_dataset.samples[:3],
                                        dm.train_transform, source=source)
        assert epoch(dm) == [0, 1, 2, 3] and dm.num_skipped() == 1
    # and a whole run over the folder finishes
    run_dir = tmp_path / "run"
    with deadline(120):
        trainer = pretrain(compose("pretrain", tiny_overrides(run_dir, "data=folder", f"data.root={root}",
                                                              "data.val_fraction=0", "~callbacks.reconstructions")))
    assert trainer.global_step == 6 and (run_dir / "checkpoints" / "last.ckpt").is_file()


# ------------------------------------------------------------------------------------------ unreadable runs


def folder_with_a_bad_run(root: Path, good: int = 20, bad: int = 100, bad_first: bool = False) -> Path:
    write_images(root, good, size=32, prefix="good")
    for i in range(bad):  # "bad" sorts after "good"; "aaa" before
        (root / f"{'aaa' if bad_first else 'zzz'}_{i:03d}.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.mark.parametrize("bad_first", [False, True])
def test_a_hundred_unreadable_files_in_a_row_are_read_through_and_counted(tmp_path, bad_first):
    root = folder_with_a_bad_run(tmp_path / "images", bad_first=bad_first)
    with deadline(60), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = make_dm(ImageFolderSource(str(root)), batch_size=4)
        indices = epoch(dm)
    assert indices == list(range(120))  # every index gives an item (a readable stand-in)
    assert dm.num_skipped() == 100 and dm.describe()["skipped"] == 100


def test_a_run_over_a_hundred_unreadable_files_in_a_row_finishes(tmp_path, one_thread):
    root = folder_with_a_bad_run(tmp_path / "images", good=8, bad=100)
    run_dir = tmp_path / "run"
    with deadline(150), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pretrain(compose("pretrain", tiny_overrides(
            run_dir, "data=folder", f"data.root={root}", "data.val_fraction=0", "data.repeat=1",
            "data.batch_size=16", "~callbacks.reconstructions", "trainer.max_epochs=1")))
    assert trainer.global_step == 108 // 16 and trainer.datamodule.num_skipped() == 100
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_no_readable_file_at_all_is_one_line_naming_data_root(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(150):
        (root / f"x{i:03d}.png").write_bytes(b"")
    with deadline(60), pytest.raises(ConfigError) as info:
        make_dm(ImageFolderSource(str(root)))
    text = str(info.value)
    assert text.startswith("data.root=") and "all 150 files failed to decode" in text and "\n" not in text


def test_files_that_all_turn_unreadable_mid_run_end_in_one_line_from_a_loader_worker(tmp_path):
    root = tmp_path / "images"
    write_images(root, 6, size=32)
    dm = make_dm(ImageFolderSource(str(root)), num_workers=1, persistent_workers=False)
    for path in root.iterdir():  # the disk goes bad after setup
        path.write_bytes(b"")
    with deadline(60), warnings.catch_warnings(), pytest.raises(NoReadableImagesError) as info:
        warnings.simplefilter("ignore")
        next(iter(dm.train_dataloader()))
    text = str(info.value)
    assert text.startswith("data.root=") and "no readable images: all 6 files failed to decode" in text
    assert "\n" not in text and "Traceback" not in text


# ------------------------------------------------------------------------------------------ shards


@pytest.fixture
def shard_folder(tmp_path) -> Path:
    """16 images as 4 shards of 4, with the index make_shards writes."""
    paths = write_images(tmp_path / "img", 16, size=32)
    out = tmp_path / "shards"
    write_shards([(str(p), -1) for p in paths], out, maxcount=4)
    return out


def edit_index(folder: Path, shard: int, **changes) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["shardlist"][shard].update(changes)
    (folder / INDEX).write_text(json.dumps(index))


def shard_error(urls, **kwargs) -> str:
    with deadline(30), pytest.raises(ConfigError) as info:
        make_dm(ShardSource(urls=str(urls), **kwargs))
    text = str(info.value)
    assert text.startswith("data.source.urls=") and "\n" not in text
    return text


def test_a_shard_listed_in_the_index_but_missing_is_one_line(shard_folder):
    os.remove(shard_folder / "shard-000002.tar")
    for verify in (True, False):
        text = shard_error(shard_folder, verify=verify)
        assert "shard-000002.tar" in text and "shard not found" in text and INDEX in text


@pytest.mark.parametrize("cut", [700, 10240])
def test_a_truncated_shard_is_one_line_naming_it(shard_folder, cut):
    shard = shard_folder / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:cut])
    text = shard_error(shard_folder)
    assert "shard-000001.tar" in text and "truncated" in text
    os.remove(shard_folder / INDEX)  # no index (sizes unknown): the tar headers tell
    text = shard_error(shard_folder)
    assert "shard-000001.tar" in text and "truncated" in text


def test_a_garbage_shard_is_one_line_naming_it(shard_folder):
    shard = shard_folder / "shard-000003.tar"
    shard.write_bytes(os.urandom(shard.stat().st_size))  # the size the index says: only the headers tell
    text = shard_error(shard_folder)
    assert "shard-000003.tar" in text and "not a readable tar shard" in text
    os.remove(shard_folder / INDEX)
    assert "shard-000003.tar" in shard_error(f"{shard_folder}/shard-{{000000..000003}}.tar")


@pytest.mark.parametrize("count", [6, 2, "four"])
def test_a_wrong_count_in_the_index_is_one_line_naming_the_shard(shard_folder, count):
    edit_index(shard_folder, 1, nsamples=count)
    text = shard_error(shard_folder)
    assert "shard-000001.tar" in text
    assert (f"shard has 4 samples, its index says {count}" in text) if isinstance(count, int) else "nsamples='four'" in text


def test_without_verify_a_shard_that_holds_fewer_samples_than_its_index_is_skipped_and_counted(shard_folder):
    edit_index(shard_folder, 1, nsamples=6)
    with deadline(30):
        dm = make_dm(ShardSource(urls=str(shard_folder), verify=False))
        with pytest.warns(UserWarning, match="shard-000001.tar has 4 samples, its index says 6"):
            indices = sorted(i for batch in dm.train_dataloader() for i in batch["index"].tolist())
    assert indices == list(range(18)) and dm.num_skipped() == 2


def test_intact_shards_still_read(shard_folder):
    with deadline(30):
        dm = make_dm(ShardSource(urls=str(shard_folder)))
        assert epoch(dm) == list(range(16)) and dm.num_skipped() == 0
    shards, _ = resolve_shards(str(shard_folder))
    assert [s["nsamples"] for s in shards] == [4, 4, 4, 4]


def test_a_missing_shard_through_the_cli_is_exit_2_and_one_line(tmp_path, shard_folder):
    os.remove(shard_folder / "shard-000000.tar")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "mim_lightning.train", "experiment=null", "data=webdataset",
                             f"data.source.urls={shard_folder}", "trainer=cpu", "backbone=vit_test",
                             "data.image_size=32", "data.num_workers=0", f"run_dir={tmp_path / 'run'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mim_lightning: error: data.source.urls="), result.stderr[-2000:]
    assert "shard-000000.tar" in lines[0] and "shard not found" in lines[0]
