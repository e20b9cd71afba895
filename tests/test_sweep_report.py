"""A 2x2 local sweep writes 4 runs, and scripts/sweep_report.py turns them into a table and a plot."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
            "method:\n  model:\n    _target_: mim_lightning.models.mae.MaskedAutoencoder\nbackbone:\n  name: vit_test\n"
            "mask:\n  _target_: mim_lightning.masking.RandomMask\n  input_size: 32\n  patch_size: 8\n  unit: 8\n"
            f"  ratio: {0.5 if name == 'a' else 0.75}\n")
        if metrics:
            (job / "csv").mkdir()
            (job / "csv" / "metrics.csv").write_text(metrics)
    rows, swept = sweep_report.build_rows(tmp_path)
    assert swept == ["mask.ratio"]  # trainer=cpu is the same in both jobs
    first, second = rows
    assert first["train/loss"] == 1.5 and first["val/loss"] == 1.7 and first["step"] == 5 and first["status"] == "ok"
    assert second["status"] == "no metrics" and second["train/loss"] is None
    assert 0 < first["mask/avg_dist"] < second["mask/avg_dist"]


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
