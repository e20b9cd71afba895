"""Checkpoint retention (``callbacks.checkpoint.keep_last_k``), file permissions and leftover temp files."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from mim_lightning import ConfigError, compose
from mim_lightning.api import build_callbacks, pretrain
from mim_lightning.callbacks import RunCheckpoint
from mim_lightning.callbacks.checkpoint import last_checkpoint
from mim_lightning.checkpoints.io import TEMP_PATTERN, AtomicCheckpointIO

from conftest import tiny_overrides, write_images


@pytest.fixture
def folder(tmp_path) -> Path:
    """12 images: 6 optimizer steps per epoch at batch 4 with ``data.repeat=2``."""
    root = tmp_path / "images"
    write_images(root, 12, size=40)
    return root


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def run(folder: Path, run_dir: Path, *extra: str):
    return pretrain(compose("pretrain", tiny_overrides(
        run_dir, "experiment=null", "data=folder", f"data.root={folder}", "data.val_fraction=0",
        "~callbacks.reconstructions", "callbacks.checkpoint.every_n_train_steps=1", *extra)))


def names(run_dir: Path) -> set[str]:
    return {path.name for path in (run_dir / "checkpoints").iterdir()}


def steps(*numbers: int) -> set[str]:
    return {f"step{n:08d}.ckpt" for n in numbers}


@pytest.mark.parametrize("override,kept", [(None, (5, 6)), ("-1", (1, 2, 3, 4, 5, 6)), ("0", ())])
def test_retention_keeps_last_and_the_newest_k_snapshots(tmp_path, folder, override, kept):
    run_dir = tmp_path / "run"
    extra = [] if override is None else [f"callbacks.checkpoint.keep_last_k={override}"]
    trainer = run(folder, run_dir, *extra)
    assert trainer.global_step == 6
    assert names(run_dir) == {"last.ckpt"} | steps(*kept)
    assert last_checkpoint(run_dir / "checkpoints").name == "last.ckpt"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    for number in kept:
        saved = torch.load(run_dir / "checkpoints" / f"step{number:08d}.ckpt", weights_only=False)
        assert saved["global_step"] == number


def test_a_resumed_run_prunes_the_snapshots_of_the_interrupted_one(tmp_path, folder):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash at step 4"):
        run(folder, run_dir, "trainer.max_epochs=2", "callbacks.checkpoint.keep_last_k=-1",
            "+callbacks.crash._target_=conftest.RaiseAtStep", "+callbacks.crash.step=4")
    assert names(run_dir) == {"last.ckpt"} | steps(1, 2, 3, 4)

    trainer = run(folder, run_dir, "trainer.max_epochs=2", "resume=auto")
    assert trainer.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt") and trainer.global_step == 12
    assert names(run_dir) == {"last.ckpt"} | steps(11, 12)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12


def test_files_follow_the_umask_and_leftover_temp_files_go_at_the_start(tmp_path, folder, umask_022, caplog):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    leftovers = [checkpoints / ".last.ckpt.k2x_9abc.tmp", checkpoints / ".step00000003.ckpt.0123abcd.tmp"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)  # what a kill during torch.save leaves
    unrelated = [checkpoints / "notes.tmp", checkpoints / ".keep", checkpoints / ".x.tmp"]
    for path in unrelated:
        path.write_text("mine")
    with caplog.at_level(logging.INFO, logger="mim_lightning"):
        run(folder, run_dir, "trainer.max_steps=3")
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in unrelated)
    lines = [r.getMessage() for r in caplog.records if "interrupted checkpoint save" in r.getMessage()]
    assert len(lines) == 1 and "removed 2 temporary file(s)" in lines[0] and leftovers[0].name in lines[0]
    assert names(run_dir) == {"last.ckpt", "notes.tmp", ".keep", ".x.tmp"} | steps(2, 3)
    for name in ["last.ckpt", *sorted(steps(2, 3))]:
        assert stat.S_IMODE((checkpoints / name).stat().st_mode) == 0o644, name


def test_atomic_save_honours_the_umask_for_files_and_new_folders(tmp_path):
    previous = os.umask(0o027)
    try:
        target = tmp_path / "new" / "deeper" / "weights.ckpt"
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, target)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(target.parent.parent.stat().st_mode) == 0o750
    assert [p.name for p in target.parent.iterdir()] == ["weights.ckpt"]  # no temp file left


def test_temp_pattern_matches_the_temp_names_only():
    assert TEMP_PATTERN.match(".last.ckpt.ab12cd34.tmp") and TEMP_PATTERN.match(".step00000003.ckpt.k_x9abc0.tmp")
    for name in ["last.ckpt", ".last.ckpt", "x.tmp", ".x.tmp", ".last.ckpt.short.tmp", ".last.ckpt.ab12cd34.tmp.1"]:
        assert not TEMP_PATTERN.match(name), name


@pytest.mark.parametrize("value", ["-2", "two", "true", "1.5"])
def test_bad_keep_last_k_is_a_one_line_config_error(tmp_path, value):
    cfg = compose("pretrain", ["experiment=null", f"run_dir={tmp_path}", f"callbacks.checkpoint.keep_last_k={value}"])
    with pytest.raises(ConfigError) as info:
        build_callbacks(cfg)
    assert info.value.key == "callbacks.checkpoint.keep_last_k" and "-1 to keep every snapshot" in info.value.allowed
    assert "\n" not in str(info.value)


def test_save_top_k_without_monitor_is_a_synonym_and_monitor_excludes_keep_last_k(tmp_path):
    assert RunCheckpoint(dirpath=str(tmp_path), save_top_k=-1).keep_last_k == -1
    assert RunCheckpoint(dirpath=str(tmp_path)).keep_last_k == 2
    with pytest.raises(ConfigError, match="synonym"):
        RunCheckpoint(dirpath=str(tmp_path), save_top_k=1, keep_last_k=3)
    best = RunCheckpoint(dirpath=str(tmp_path), monitor="val/loss", save_top_k=3)
    assert best.keep_last_k is None and best.save_top_k == 3
    with pytest.raises(ConfigError, match="keep_last_k"):
        RunCheckpoint(dirpath=str(tmp_path), monitor="val/loss", keep_last_k=2)
