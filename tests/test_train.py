"""End-to-end runs: the CLI, checkpoints and resume, DDP on two CPU processes, sweeps, bad input."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mim_lightning import compose, pretrain
from mim_lightning.cli import run_or_exit

from conftest import REPO, tiny_overrides, write_images

CLI_TIMEOUT = 300


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "mim_lightning.train", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as stream:
        return list(csv.DictReader(stream))


def test_default_config_fast_dev_run_through_the_cli(tmp_path):
    result = run_cli("trainer.fast_dev_run=2", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in result.stderr + result.stdout
    assert (tmp_path / "run" / "config.yaml").exists()


def test_a_run_writes_checkpoint_metrics_and_reconstructions(tmp_path, image_folder):
    (image_folder / "corrupt.png").write_bytes(b"\x89PNG broken")
    run_dir = tmp_path / "run"
    cfg = compose("pretrain", tiny_overrides(run_dir, "data=folder", f"data.root={image_folder}", "trainer.max_epochs=2",
                                                    "data.val_fraction=0.1"))
    trainer = pretrain(cfg)
    assert trainer.global_step > 0
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    rows = read_metrics(run_dir)
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    assert any(r.get("train/grad_norm") for r in rows) and any(r.get("train/lr") for r in rows)
    skipped = [float(r["data/skipped"]) for r in rows if r.get("data/skipped")]
    assert skipped and max(skipped) == 1.0
    pngs = sorted((run_dir / "reconstructions").glob("step_*.png"))
    assert pngs
    with Image.open(pngs[-1]) as grid:
        width, height = grid.size  # 4 panels per row, 4 images (val, then train) at 128 px, under a title band
        assert width == 4 * (128 + 2) and height > 4 * (128 + 2)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["config"]["backbone"]["name"] == "vit_test"


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, image_folder):
    common = ["data=folder", f"data.root={image_folder}", "~callbacks.reconstructions"]
    straight = pretrain(compose("pretrain", tiny_overrides(tmp_path / "straight", *common, "trainer.max_epochs=2")))
    first = pretrain(compose("pretrain", tiny_overrides(tmp_path / "first", *common, "trainer.max_epochs=2",
                                                        "+callbacks.stop._target_=conftest.StopAfterEpoch")))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = pretrain(compose("pretrain", tiny_overrides(tmp_path / "resumed", *common, "trainer.max_epochs=2",
                                                          f"ckpt_path={ckpt}")))
    assert first.global_step * 2 == straight.global_step == resumed.global_step
    a = straight.lightning_module.state_dict()
    b = resumed.lightning_module.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lr_a = straight.optimizers[0].param_groups[0]["lr"]
    assert lr_a == resumed.optimizers[0].param_groups[0]["lr"]


def test_ddp_with_two_cpu_processes(tmp_path):
    result = run_cli("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                     *tiny_overrides(tmp_path / "ddp")[:-1], f"run_dir={tmp_path / 'ddp'}", "trainer.max_steps=3")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "effective batch 8 = 4 per device x 2 devices" in output
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").exists()


def test_a_sweep_runs_one_job_per_point(tmp_path):
    result = run_cli("-m", "mask.ratio=0.5,0.75", "trainer.fast_dev_run=1", *tiny_overrides(tmp_path / "unused")[:-1],
                     f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-3000:]
    ratios = sorted(float(line.split(":")[1]) for job in ("0", "1")
                    for line in (tmp_path / "sweep" / job / "config.yaml").read_text().splitlines()
                    if line.startswith("  ratio:"))
    assert ratios == [0.5, 0.75]


@pytest.mark.parametrize("args,pattern", [
    (["method=nope"], "method='nope': no option 'nope' in conf/method/; allowed: "),
    (["data=folder"], "data.root='???': missing mandatory value"),
])
def test_cli_bad_input_prints_one_line_and_exits_2(args, pattern, tmp_path):
    result = run_cli(*args, f"run_dir={tmp_path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], result.stderr[-2000:]


@pytest.mark.parametrize("overrides,pattern", [
    (["data.image_size=60"], "data.image_size=60: not divisible by 8; allowed: a multiple of backbone.patch_size=8"),
    (["mask.ratio=1.5"], "mask.ratio=1.5; allowed: a number strictly between 0 and 1"),
    (["mask.ratio=0"], "mask.ratio=0; allowed: a number strictly between 0 and 1"),
    (["mask=simmim", "mask.unit=12"], "mask.unit=12: not a multiple of the patch"),
    (["data=folder", "data.root=/no/such/folder"], "data.root='/no/such/folder': no such folder"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt': no such file"),
    (["data.batch_size=1000"], "data.batch_size=1000"),
    (["backbone.num_heads=5"], "backbone.num_heads=5"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(overrides, pattern, tmp_path, capsys):
    cfg = compose("pretrain", tiny_overrides(tmp_path / "bad", *overrides))
    with pytest.raises(SystemExit) as info:
        run_or_exit(pretrain, cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mim_lightning: error: ") and pattern in err[-1], err


def test_empty_data_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cfg = compose("pretrain", tiny_overrides(tmp_path / "run", "data=folder", f"data.root={tmp_path / 'empty'}"))
    with pytest.raises(SystemExit) as info:
        run_or_exit(pretrain, cfg)
    assert info.value.code == 2
    assert "no images found" in capsys.readouterr().err


def test_non_finite_loss_stops_the_run_with_a_message(tmp_path, capsys, monkeypatch):
    from mim_lightning.methods.mae.model import MaskedAutoencoder

    original = MaskedAutoencoder.forward

    def nan_loss(self, images, mask=None):
        output = original(self, images, mask)
        output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MaskedAutoencoder, "forward", nan_loss)
    cfg = compose("pretrain", tiny_overrides(tmp_path / "nan"))
    with pytest.raises(SystemExit) as info:
        run_or_exit(pretrain, cfg)
    assert info.value.code == 1
    assert "non-finite training loss (nan) at step 0" in capsys.readouterr().err


def test_csv_tensorboard_and_offline_wandb_loggers_record_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "logged"
    pretrain(compose("pretrain", tiny_overrides(run_dir, "logger=[csv,tensorboard,wandb]", "~callbacks.reconstructions")))
    assert read_metrics(run_dir)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))


def test_gradient_accumulation_counts_in_the_lr_rule_and_the_schedule(tmp_path, image_folder):
    run_dir = tmp_path / "accum"
    trainer = pretrain(compose("pretrain", tiny_overrides(run_dir, "data=folder", f"data.root={image_folder}",
                                                          "trainer.accumulate_grad_batches=2", "method.lr.base=1e-3",
                                                          "~callbacks.reconstructions")))
    module = trainer.lightning_module
    assert module.effective_batch_size() == 4 * 2
    assert module.learning_rate() == pytest.approx(1e-3 * 8 / 256)
    batches = trainer.num_training_batches
    # Lightning also steps on the last, incomplete accumulation of an epoch
    assert trainer.global_step == -(-batches // 2)
    warmup, total = module.schedule_steps()
    assert total == trainer.global_step


def test_multistep_schedule_with_scaled_min_and_warmup(tmp_path, image_folder):
    trainer = pretrain(compose("pretrain", tiny_overrides(
        tmp_path / "ms", "data=folder", f"data.root={image_folder}", "~callbacks.reconstructions", "trainer.max_epochs=2",
        "method.lr.base=1e-3", "method.lr.base_batch_size=2", "method.lr.warmup_steps=0", "method.lr.schedule=multistep",
        "method.lr.milestones_epochs=[1]", "method.lr.gamma=0.5", "method.lr.scale_min_and_warmup=true",
        "method.lr.min=1e-5")))
    module = trainer.lightning_module
    assert module.batch_factor() == 2.0
    assert module.min_and_warmup_start_lr() == (pytest.approx(2e-5), 0.0)
    # after the epoch-1 milestone the lr is halved: 1e-3 * 4 / 2 * 0.5
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)


def test_unknown_schedule_is_a_config_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_or_exit(pretrain, compose("pretrain", tiny_overrides(tmp_path / "s", "method.lr.schedule=step")))
    assert "method.lr.schedule='step'" in capsys.readouterr().err


def test_monitor_scalars_run_info_and_wandb_id_in_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "monitored"
    trainer = pretrain(compose("pretrain", tiny_overrides(run_dir, "logger=[csv,tensorboard,wandb]")))
    rows = read_metrics(run_dir)
    for key in ("perf/images_per_sec", "mask/ratio", "mask/avg_dist", "mask/config_ratio"):
        assert any(r.get(key) for r in rows), key
    assert [float(r["mask/ratio"]) for r in rows if r.get("mask/ratio")][0] == pytest.approx(12 / 16)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    info = checkpoint["hyper_parameters"]["config"]["run_info"]
    assert info["torch"] == torch.__version__ and len(info["git_commit"] or "x" * 40) == 40
    wandb_id = checkpoint["mim_lightning"]["wandb_id"]
    assert wandb_id == trainer.loggers[2].version
    # the reconstruction grid reached TensorBoard and W&B
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "reconstructions" in events.Tags()["images"]
    media = list((run_dir / "wandb").glob("offline-run-*/files/media/images/reconstructions_*.png"))
    assert media
    # resuming continues the same W&B run
    from mim_lightning.api import continue_wandb_run

    cfg = compose("pretrain", tiny_overrides(tmp_path / "again", "logger=wandb"))
    continue_wandb_run(cfg, str(run_dir / "checkpoints" / "last.ckpt"))
    assert cfg.logger.wandb.id == wandb_id and cfg.logger.wandb.resume == "allow"
