"""A 2x2 local sweep writes 4 runs, and scripts/sweep_report.py turns them into a table and a plot."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, write_images


def load_script():
    spec = importlib.util.spec_from_file_location("sweep_report", REPO / "scripts" / "sweep_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep_report = load_script()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """``-m mask.ratio=0.5,0.75 mask.unit=8,16`` with vit_test at 32px on a labelled folder, probes on."""
    base = tmp_path_factory.mktemp("sweep")
    for label, name in enumerate(["cat", "dog", "emu"]):
        write_images(base / "data" / name, 8, size=40, seed=10 + label, prefix=name)
    out = base / "multirun"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "MIM_LIGHTNING_CACHE": str(base / "cache")}
    command = [sys.executable, "-m", "mim_lightning.train", "-m", "mask.ratio=0.5,0.75", "mask.unit=8,16",
               "backbone=vit_test", "data=imagefolder", f"data.root={base / 'data'}", "data.image_size=32",
               "data.batch_size=4", "data.num_workers=0", "data.repeat=1", "data.val_fraction=0.25", "trainer=cpu",
               "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "callbacks=probes", "callbacks.knn.k=3",
               "callbacks.knn.every_n_steps=0", "~callbacks.progress_bar", "~callbacks.reconstructions",
               f"hydra.sweep.dir={out}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_2x2_sweep_writes_4_runs(sweep):
    jobs = sweep_report.find_jobs(sweep)
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / "config.yaml").is_file() and (job / "csv" / "metrics.csv").is_file()


def test_report_writes_table_and_plot(sweep, tmp_path):
    paths = sweep_report.report(sweep, tmp_path / "report")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4
    assert {(float(r["mask.ratio"]), int(r["mask.unit"])) for r in rows} == {(0.5, 8), (0.5, 16), (0.75, 8), (0.75, 16)}
    for row in rows:
        assert row["method"] == "MaskedAutoencoder" and row["backbone"] == "vit_test" and row["status"] == "ok"
        assert 0 < float(row["train/loss"]) < 10 and 0 < float(row["val/loss"]) < 10
        assert 0 <= float(row["probe/knn_top1"]) <= 1 and 0 <= float(row["probe/linear_top1"]) <= 1
    dist = {(float(r["mask.ratio"]), int(r["mask.unit"])): float(r["mask/avg_dist"]) for r in rows}
    # larger hidden squares and more hiding both move hidden pixels further from visible ones
    assert dist[(0.5, 16)] > dist[(0.5, 8)] and dist[(0.75, 16)] > dist[(0.75, 8)] and dist[(0.75, 8)] > dist[(0.5, 8)]

    markdown = paths["md"].read_text().splitlines()
    header = next(line for line in markdown if line.startswith("| job"))
    assert "mask.ratio" in header and "mask/avg_dist" in header and "probe/knn_top1" in header
    assert sum(line.startswith("| ") for line in markdown) == 5  # header + 4 runs

    with Image.open(paths["png"]) as image:
        # 4 metric rows (train/val loss, kNN, linear) x 3 x-axes (ratio, unit, AvgDist) at 100 dpi
        assert image.format == "PNG" and image.size == (1260, 1280)
        assert len(set(image.convert("L").getdata())) > 20  # drawn, not blank


def test_command_line(sweep, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep_report.py"), str(sweep), "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert {Path(line).name for line in result.stdout.split()} == {"sweep_report.csv", "sweep_report.md",
                                                                   "sweep_report.png"}


def test_no_runs_is_a_one_line_error(tmp_path, capsys):
    assert sweep_report.main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("sweep_report: error:") and "no runs found" in error and error.count("\n") == 1


def test_metrics_and_avg_dist_fallback(tmp_path):
    """Last logged values win; a run without logged AvgDist gets it from its mask config; a job that
    never logged is listed as such."""
    for name, metrics in {"a": "step,train/loss,val/loss\n0,2.0,\n5,1.5,\n5,,1.7\n", "b": None}.items():
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- mask.ratio={0.5 if name == 'a' else 0.75}\n- trainer=cpu\n")
        (job / "config.yaml").write_text(
            "method:\n  model:\n    _target_: mim_lightning.methods.mae.model.MaskedAutoencoder\nbackbone:\n  name: vit_test\n"
            "mask:\n  _target_: mim_lightning.masking.RandomMask\n  input_size: 32\n  patch_size: 8\n  unit: 8\n"
            f"  ratio: {0.5 if name == 'a' else 0.75}\n")
        if metrics:
            (job / "csv").mkdir()
            (job / "csv" / "metrics.csv").write_text(metrics)
    rows, swept = sweep_report.build_rows(tmp_path)
    assert swept == ["mask.ratio"]  # trainer=cpu is the same in both jobs
    first, second = rows
    assert first["train/loss"] == 1.5 and first["val/loss"] == 1.7 and first["step"] == 5 and first["status"] == "ok"
    assert second["status"] == "failed" and second["reason"] == "no metrics logged" and second["train/loss"] is None
    assert 0 < first["mask/avg_dist"] < second["mask/avg_dist"]


def make_job(root: Path, name: str, ratio: float, metrics: str | None, checkpoint: dict | None = None,
             logs: dict[str, str] | None = None, job_id: str | None = None) -> Path:
    """A job folder as a pretraining job leaves it: ``.hydra/``, ``config.yaml`` (2 epochs, checkpoints
    on), ``csv/metrics.csv``, ``checkpoints/last.ckpt`` (only the progress fields the report reads)."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- mask.ratio={ratio}\n")
    (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    name: train\n    id: '{job_id or name}'\n")
    (job / "config.yaml").write_text(
        "method:\n  model:\n    _target_: mim_lightning.methods.mae.model.MaskedAutoencoder\nbackbone:\n  name: vit_test\n"
        f"mask:\n  _target_: mim_lightning.masking.RandomMask\n  input_size: 32\n  patch_size: 8\n  ratio: {ratio}\n"
        "trainer:\n  max_epochs: 2\n  max_steps: -1\n  log_every_n_steps: 1\n"
        f"callbacks:\n  checkpoint:\n    dirpath: {job / 'checkpoints'}\nlogger:\n  csv:\n    save_dir: {job}\n")
    if metrics is not None:
        (job / "csv").mkdir()
        (job / "csv" / "metrics.csv").write_text(metrics)
    if checkpoint is not None:
        (job / "checkpoints").mkdir()
        step, epoch, last_batch = checkpoint["step"], checkpoint["epoch"], checkpoint["last_batch"]
        torch.save({"global_step": step, "epoch": epoch, "state_dict": {"w": torch.zeros(1)},
                    "loops": {"fit_loop": {"epoch_loop.batch_progress": {"is_last_batch": last_batch}}}},
                   job / "checkpoints" / "last.ckpt")
    for log, text in (logs or {}).items():
        path = root / log if log.startswith(".submitit") else job / log
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return job


def steps_csv(last: int, per_epoch: int = 6) -> str:
    """Step logs 0..last (the step before each update), epoch by epoch, as Lightning's CSV logger writes them
    (AvgDist logged once, so that the report need not compute it)."""
    return "step,epoch,train/loss,mask/avg_dist\n0,,,5.0\n" + "".join(
        f"{s},{s // per_epoch},{2.0 - s / 100},\n" for s in range(last + 1))


TRACEBACK = """[2026-12-03 10:00:00,000][mim_lightning][INFO] - training
Error executing job with overrides: ['mask.ratio=0.6']
Traceback (most recent call last):
  File "train.py", line 12, in main
    trainer.fit(module)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
"""


def test_failed_and_unfinished_jobs_are_marked_and_left_out_of_the_plot(tmp_path):
    root = tmp_path / "multirun"
    done = {"step": 12, "epoch": 1, "last_batch": True}
    make_job(root, "0", 0.5, steps_csv(11), done)
    make_job(root, "1", 0.6, steps_csv(9), {"step": 8, "epoch": 1, "last_batch": False})  # killed after step 9
    make_job(root, "2", 0.7, steps_csv(3), {"step": 3, "epoch": 0, "last_batch": False}, job_id="4242_2",  # submitit: the traceback is in its .err file
             logs={".submitit/4242_2/4242_2_0_log.err": TRACEBACK, ".submitit/4242_1/4242_1_0_log.err": "fine\n"})
    make_job(root, "3", 0.75, steps_csv(5), {"step": 6, "epoch": 0, "last_batch": True})  # 1 of 2 epochs
    make_job(root, "4", 0.8, steps_csv(2))  # never reached a checkpoint
    make_job(root, "5", 0.85, steps_csv(7), {"step": 6, "epoch": 1, "last_batch": False},
             logs={"train.log": "mim_lightning: error: non-finite training loss (nan) at step 7\n"})
    make_job(root, "6", 0.9, steps_csv(6), {"step": 6, "epoch": 1, "last_batch": False},
             logs={"train.log": "mim_lightning: stopped by a signal; last.ckpt was written, resume with resume=auto\n"})
    make_job(root, "7", 0.95, steps_csv(11), done, logs={"train.log": TRACEBACK})  # resumed after a crash, finished

    rows, swept = sweep_report.build_rows(root)
    status = {row["job"]: (row["status"], row["reason"]) for row in rows}
    assert status["0"] == ("ok", "")
    assert status["1"][0] == "failed" and "step 9 after the last checkpoint (step 8)" in status["1"][1]
    assert status["2"] == ("failed", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB "
                                     "(4242_2_0_log.err)")
    assert status["3"][0] == "unfinished" and "1 epoch(s) done; max_epochs=2" in status["3"][1]
    assert status["4"] == ("failed", "no checkpoint")
    assert status["5"] == ("failed", "non-finite training loss (nan) at step 7 (train.log)")
    assert status["6"] == ("unfinished", "stopped by a signal (train.log)")
    assert status["7"] == ("ok", "finished; the logs also show: torch.OutOfMemoryError: CUDA out of memory. "
                                 "Tried to allocate 2.00 GiB (train.log)")

    metrics, panels = sweep_report.plot_series(rows, swept)
    plotted_jobs = {point[3] for groups in panels.values() for points in groups.values() for point in points}
    assert metrics == ["train/loss"] and plotted_jobs == {"0", "7"}

    paths = sweep_report.report(root, tmp_path / "report")
    table = {row["job"]: row for row in csv.DictReader(paths["csv"].open())}
    assert table["2"]["status"] == "failed" and table["2"]["reason"].startswith("torch.OutOfMemoryError")
    markdown = paths["md"].read_text()
    assert "8 runs, 4 failed, 2 unfinished (left out of the plot)." in markdown and "| status | reason |" in markdown


def test_without_checkpoints_a_run_whose_metrics_stop_early_is_unfinished(tmp_path):
    root = tmp_path / "multirun"
    for name, ratio, last in [("0", 0.5, 11), ("1", 0.75, 4)]:
        job = make_job(root, name, ratio, steps_csv(last))
        config = (job / "config.yaml").read_text().replace("max_epochs: 2\n  max_steps: -1",
                                                           "max_epochs: 5\n  max_steps: 12")
        (job / "config.yaml").write_text(config.split("callbacks:")[0])  # no checkpoint callback
    rows, _ = sweep_report.build_rows(root)
    assert [(row["status"], row["reason"]) for row in rows] == [
        ("ok", ""), ("unfinished", "metrics end at step 4 in epoch 1; max_steps=12 / max_epochs=5")]


def test_slurm_launcher_composes():
    """``hydra/launcher=submitit_slurm`` (needs hydra-submitit-launcher) composes with the pretraining config:
    one SLURM task per GPU, so that Lightning finds the ranks SLURM started instead of relaunching the script."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mim_lightning.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("pretrain", ["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                                   "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8",
                                   "hydra.launcher.partition=gpu", "trainer=ddp", "trainer.devices=8",
                                   "trainer.num_nodes=2"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices == 8
    assert launcher.nodes == cfg.trainer.num_nodes == 2
    assert launcher.submitit_folder.startswith(str(cfg.hydra.sweep.dir))  # job logs beside the sweep's runs
