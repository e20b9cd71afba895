"""Interruptions, resumes, corrupt checkpoints, non-finite losses, bad data and the bad-config catalogue."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mim_lightning import compose, pretrain
from mim_lightning.callbacks.checkpoint import last_checkpoint
from mim_lightning.cli import run_or_exit

from conftest import REPO, tiny_overrides, write_images

CLI_TIMEOUT = 300


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mim_lightning.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_images(root, 24)
    return root


def run_args(folder, run_dir, *extra):
    return tiny_overrides(run_dir, "data=folder", f"data.root={folder}", "data.val_fraction=0",
                          "~callbacks.reconstructions", "trainer.max_epochs=2",
                          "callbacks.checkpoint.every_n_train_steps=3", *extra)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_kill_9_mid_epoch_then_resume_auto_matches_an_uninterrupted_run(tmp_path, folder):
    workers = "data.num_workers=2"
    straight = pretrain(compose("pretrain", run_args(folder, tmp_path / "straight", workers)))
    assert straight.num_training_batches == 12 and straight.global_step == 24

    run_dir = tmp_path / "interrupted"
    killed = run_cli(*run_args(folder, run_dir, workers, "+callbacks.kill._target_=conftest.SignalAtStep",
                               "+callbacks.kill.step=17"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 15 and saved["epoch"] == 1  # mid-epoch: 3 of 12 batches of epoch 1

    resumed = run_cli(*run_args(folder, run_dir, workers, "resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 24
    assert_same_weights(final["state_dict"], straight.lightning_module.state_dict())


def test_resume_auto_skips_a_corrupt_checkpoint_and_ckpt_path_names_it(tmp_path, folder, capsys):
    run_dir = tmp_path / "run"
    pretrain(compose("pretrain", run_args(folder, run_dir, "trainer.max_epochs=1")))
    folder_ckpt = run_dir / "checkpoints"
    newest = folder_ckpt / "last.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a truncated copy
    fallback = last_checkpoint(folder_ckpt)
    assert fallback is not None and fallback.name == "step00000012.ckpt"
    assert torch.load(fallback, weights_only=False)["global_step"] == 12

    capsys.readouterr()  # the first run's own messages (the run log's console handler may write to this capture)
    with pytest.raises(SystemExit) as info:
        run_or_exit(pretrain, compose("pretrain", run_args(folder, tmp_path / "other", f"ckpt_path={newest}")))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ckpt_path=" in err[0] and "truncated" in err[0]


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, folder):
    trainer = pretrain(compose("pretrain", run_args(folder, tmp_path / "fresh", "resume=auto", "trainer.max_epochs=1")))
    assert trainer.global_step == 12


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_stop_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, folder, name):
    run_dir = tmp_path / name
    result = run_cli(*run_args(folder, run_dir, "+callbacks.sig._target_=conftest.SignalAtStep",
                               "+callbacks.sig.step=5", f"+callbacks.sig.signal={name}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped by a signal" in result.stderr
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6  # the batch in flight finished, then the run stopped


def test_injected_nan_stops_with_the_step_and_the_previous_checkpoint_loads(tmp_path, folder, capsys, monkeypatch):
    from mim_lightning.methods.mae.model import MaskedAutoencoder

    original = MaskedAutoencoder.forward
    calls = {"n": 0}

    def nan_at_step_7(self, images, mask=None):
        output = original(self, images, mask)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 8:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MaskedAutoencoder, "forward", nan_at_step_7)
    run_dir = tmp_path / "nan"
    with pytest.raises(SystemExit) as info:
        run_or_exit(pretrain, compose("pretrain", run_args(folder, run_dir)))
    assert info.value.code == 1
    assert "non-finite training loss (nan) at step 7" in capsys.readouterr().err
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def inject_nan(monkeypatch, calls_with_nan: set[int]) -> None:
    """Make MAE's training loss NaN on the given (1-based) training forward calls."""
    from mim_lightning.methods.mae.model import MaskedAutoencoder

    original = MaskedAutoencoder.forward
    calls = {"n": 0}

    def forward(self, images, mask=None):
        output = original(self, images, mask)
        if self.training:
            calls["n"] += 1
            if calls["n"] in calls_with_nan:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MaskedAutoencoder, "forward", forward)


def test_checking_every_step_stops_before_the_bad_update(tmp_path, folder, capsys, monkeypatch):
    inject_nan(monkeypatch, {8})
    run_dir = tmp_path / "every"
    with pytest.raises(SystemExit) as info:
        run_or_exit(pretrain, compose("pretrain", run_args(folder, run_dir, "nonfinite_check_every_n_steps=1")))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite training loss (nan) at step 7, epoch 0; stopping before the optimizer step" in err
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_a_nan_between_checks_never_reaches_a_checkpoint(tmp_path, folder, capsys, monkeypatch):
    """With the default cadence (50 steps) and no checkpoint before the epoch ends, the NaN of step 2 is found at
    the end of the epoch (step 12) and the run stops before the end-of-training checkpoint is written."""
    inject_nan(monkeypatch, {3})
    run_dir = tmp_path / "deferred"
    with pytest.raises(SystemExit) as info:
        run_or_exit(pretrain, compose("pretrain", run_args(folder, run_dir, "trainer.max_epochs=1",
                                                            "callbacks.checkpoint.every_n_train_steps=1000")))
    assert info.value.code == 1
    assert "non-finite training loss (nan) at step 2; found at step 12" in capsys.readouterr().err
    assert not list(run_dir.glob("checkpoints/*.ckpt"))


def test_stop_reads_the_device_flag_only_every_n_steps(tmp_path, folder, monkeypatch):
    """No host-device sync per step: the flag is read every N optimizer steps, at epoch ends and before checkpoints."""
    from mim_lightning.modules.pretrain import PretrainModule

    original = PretrainModule.check_nonfinite
    reads: list[int] = []

    def check(self):
        reads.append(self.global_step)
        return original(self)

    def no_per_step_sync(self, value):
        raise AssertionError("on_nonfinite=stop must not read the device every step")

    monkeypatch.setattr(PretrainModule, "check_nonfinite", check)
    monkeypatch.setattr(PretrainModule, "_all_finite", no_per_step_sync)
    trainer = pretrain(compose("pretrain", run_args(folder, tmp_path / "cadence", "nonfinite_check_every_n_steps=5",
                                                    "callbacks.checkpoint.every_n_train_steps=1000")))
    assert trainer.global_step == 24
    assert set(reads) == {4, 9, 12, 14, 19, 24}  # every 5th step (before its update), epoch ends, final checkpoint
    assert len(reads) <= 9


def test_on_nonfinite_skip_drops_the_step_and_counts_it(tmp_path, folder, monkeypatch):
    from mim_lightning.methods.mae.model import MaskedAutoencoder

    original = MaskedAutoencoder.forward
    calls = {"n": 0}

    def nan_twice(self, images, mask=None):
        output = original(self, images, mask)
        if self.training:
            calls["n"] += 1
            if calls["n"] in (3, 9):
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MaskedAutoencoder, "forward", nan_twice)
    trainer = pretrain(compose("pretrain", run_args(folder, tmp_path / "skip", "on_nonfinite=skip")))
    module = trainer.lightning_module
    assert module.skipped_steps == 2
    # Lightning still counts the step (and advances the lr schedule); no parameter was updated in it
    param = next(module.model.parameters())
    assert int(trainer.optimizers[0].state[param]["step"]) == 22
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # the skipped steps' rows hold the count and no loss or gradient norm of an earlier step
    import csv

    rows = list(csv.DictReader((tmp_path / "skip" / "csv" / "metrics.csv").open()))
    losses = {int(r["step"]) for r in rows if r["train/loss"]}
    norms = {int(r["step"]) for r in rows if r["train/grad_norm"]}
    assert losses == norms == set(range(24)) - {2, 8}, sorted(set(range(24)) - losses)
    assert [float(r["train/skipped_steps"]) for r in rows if int(r["step"]) in (2, 8) and r["train/skipped_steps"]] \
        == [1.0, 2.0]


def test_on_nonfinite_skip_stops_when_the_weights_diverge(tmp_path, folder, capsys, monkeypatch):
    """Skipping cannot rescue weights that are no longer finite: the run stops (exit 1) and writes no checkpoint
    from them."""
    from mim_lightning.methods.mae.model import MaskedAutoencoder

    original = MaskedAutoencoder.forward
    calls = {"n": 0}

    def diverge_at_call_5(self, images, mask=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                with torch.no_grad():
                    next(self.parameters()).mul_(float("inf"))
        return original(self, images, mask)

    monkeypatch.setattr(MaskedAutoencoder, "forward", diverge_at_call_5)
    run_dir = tmp_path / "diverged"
    with pytest.raises(SystemExit) as info:
        run_or_exit(pretrain, compose("pretrain", run_args(folder, run_dir, "on_nonfinite=skip")))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "the weights are no longer finite at step 4" in err and "1 steps skipped so far" in err
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_folder_with_5_percent_broken_files_trains_to_the_end(tmp_path):
    root = tmp_path / "dirty"
    write_images(root, 38)
    (root / "zero.png").write_bytes(b"")
    good = (root / "img_000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 3])
    run_dir = tmp_path / "run"
    trainer = pretrain(compose("pretrain", run_args(root, run_dir, "trainer.max_epochs=1")))
    assert trainer.global_step == 20  # 40 files x data.repeat 2 / batch 4
    assert trainer.datamodule.num_skipped() == 2
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("data/skipped")
    assert [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]] == [2.0]


def bad_catalogue(tmp_path: Path) -> list[tuple[list[str], str]]:
    """(overrides, text the one-line error must contain) for at least 25 bad configs and inputs."""
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    return [
        (["method=nope"], "method='nope'"),
        (["backbone=vit_zz"], "backbone='vit_zz'"),
        (["data=parquet"], "data='parquet'"),
        (["trainer=tpu"], "trainer='tpu'"),
        (["logger=mlflow"], "logger='mlflow'"),
        (["data.imagesize=64"], "data.imagesize"),
        (["data.image_size=60"], "data.image_size=60"),
        (["mask.ratio=1.5"], "mask.ratio=1.5"),
        (["mask.ratio=0"], "mask.ratio=0"),
        (["mask.ratio=-0.2"], "mask.ratio=-0.2"),
        (["mask.ratio=0.99"], "mask.ratio=0.99"),
        (["mask=simmim", "mask.unit=12"], "mask.unit=12"),
        (["mask=simmim", "mask.unit=64"], "data.image_size=32"),
        (["mask=block", "mask.min_aspect=0"], "mask.min_aspect=0"),
        (["data=folder"], "data.root='???'"),
        (["data=folder", "data.root=/no/such/folder"], "data.root='/no/such/folder'"),
        (["data=folder", f"data.root={empty}"], "no images found"),
        (["data=folder", f"data.root={a_file}"], "no such folder"),
        (["data.batch_size=0"], "data.batch_size=0"),
        (["data.batch_size=1000"], "data.batch_size=1000"),
        (["data.num_workers=-1"], "data.num_workers=-1"),
        (["data.val_fraction=1.5"], "data.val_fraction=1.5"),
        (["data.crop_scale=[0.9,0.1]"], "data.crop_scale"),
        (["data.interpolation=lanczos9"], "data.interpolation='lanczos9'"),
        (["backbone.num_heads=5"], "backbone.num_heads=5"),
        (["method.model.decoder_heads=5"], "method.model.decoder_heads=5"),
        (["method.no_weight_decay=everything"], "method.no_weight_decay='everything'"),
        (["method.lr.schedule=step"], "method.lr.schedule='step'"),
        (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt'"),
        ([f"ckpt_path={garbage}"], "not a torch checkpoint"),
        (["resume=sometimes"], "resume='sometimes'"),
        (["on_nonfinite=ignore"], "on_nonfinite='ignore'"),
        (["nonfinite_check_every_n_steps=0"], "nonfinite_check_every_n_steps=0"),
        (["trainer.precision=17"], "trainer="),
        (["data.repeat=0"], "data.repeat=0"),
        (["seed=1.5"], "seed=1.5"),
        (["seed=-1"], "seed=-1"),
        (["seed=abc"], "seed='abc'"),
        (["seed=99999999999"], "seed=99999999999"),
        (["data.hflip=2"], "data.hflip=2"),
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
        (["backbone.depth=0"], "backbone.depth=0"),
        (["callbacks.checkpoint.every_n_train_steps=0"], "callbacks.checkpoint.every_n_train_steps=0"),
        (["trainer.max_steps=ten"], "trainer.max_steps='ten'"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
        (["method.lr.value=-1"], "method.lr.value=-1"),
        (["run_dir=/proc/nope"], "run_dir='/proc/nope'"),
        (["method=simmim"], "mask.unit=32 gives 1 mask unit on the 32x32 image"),
    ]


def test_an_unwritable_cache_folder_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIM_LIGHTNING_CACHE", "/proc/nope")
    with pytest.raises(SystemExit) as info:
        run_or_exit(lambda: pretrain(compose("pretrain", tiny_overrides(tmp_path / "run"))))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert "MIM_LIGHTNING_CACHE='/proc/nope': cannot write there" in err[0]


def test_a_path_split_at_a_space_says_to_quote_it(capsys):
    from mim_lightning.cli import check_split_values

    check_split_values(["--cfg", "job", "data=folder", "~callbacks.x"])  # flags, their values and deletions pass
    with pytest.raises(SystemExit) as info:
        check_split_values(["data=folder", "data.root=/data/my", "images", "seed=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert "data.root='/data/my images'" in err[0] and "quotes: 'data.root=/data/my images'" in err[0]


def test_bad_config_catalogue_each_one_line_and_exit_2(tmp_path, capsys):
    catalogue = bad_catalogue(tmp_path)
    assert len(catalogue) >= 25
    for overrides, expected in catalogue:
        with pytest.raises(SystemExit) as info:
            run_or_exit(lambda o=overrides: pretrain(compose("pretrain", tiny_overrides(tmp_path / "bad", *o))))
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2, overrides
        assert len(err) == 1 and err[0].startswith("mim_lightning: error: "), (overrides, err)
        assert expected in err[0], (overrides, err[0])
        assert "Traceback" not in err[0]


@pytest.mark.parametrize("index", [0, 6, 16])
def test_bad_config_through_the_cli_prints_no_traceback(tmp_path, index):
    overrides, expected = bad_catalogue(tmp_path)[index]
    result = run_cli(*tiny_overrides(tmp_path / "cli", *overrides))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]


def test_resume_is_exact_with_drop_path_using_the_global_random_stream(tmp_path, folder):
    """SimMIM's ViT uses drop-path (0.1), drawn from the global torch RNG: the checkpoint must restore
    it, and building data iterators after the restore must not advance it."""
    extra = ["method=simmim", "backbone.depth=2", "mask.unit=16"]
    straight = pretrain(compose("pretrain", run_args(folder, tmp_path / "straight", *extra)))
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(compose("pretrain", run_args(folder, crashed, *extra, "+callbacks.crash._target_=conftest.RaiseAtStep",
                                              "+callbacks.crash.step=16")))
    assert torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 15
    resumed = pretrain(compose("pretrain", run_args(folder, crashed, *extra, "resume=auto")))
    assert resumed.global_step == 24
    assert_same_weights(resumed.lightning_module.state_dict(), straight.lightning_module.state_dict())


def test_a_second_run_on_a_live_run_folder_is_refused_until_the_first_dies(tmp_path, capsys):
    """The lock is the one fit_run takes: held by a live process it refuses a fresh run and a resume (one line with
    the owner's pid, exit 2); after a kill -9 of the owner the next run takes the folder."""
    run_dir = tmp_path / "shared"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mim_lightning.runlock import lock_run_dir; "
         f"lock_run_dir({str(run_dir)!r}); print('locked', flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["resume=auto"]):
            with pytest.raises(SystemExit) as info:
                run_or_exit(lambda e=extra: pretrain(compose("pretrain", tiny_overrides(run_dir, *e))))
            err = capsys.readouterr().err.strip().splitlines()
            assert info.value.code == 2 and len(err) == 1, err
            assert f"run_dir='{run_dir}'" in err[0] and f"in use by a live run (pid {holder.pid} on " in err[0]
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock
        holder.wait(timeout=30)
    trainer = pretrain(compose("pretrain", tiny_overrides(run_dir)))
    assert trainer.global_step > 0 and (run_dir / "config.yaml").exists()
    from mim_lightning.runlock import lock_run_dir, unlock_run_dir

    assert lock_run_dir(run_dir)  # given back at the end of the run (a sweep's next job may take it)
    unlock_run_dir(run_dir)


def test_ckpt_path_of_another_method_or_size_is_one_line_naming_the_difference(tmp_path, capsys):
    first = tmp_path / "mae"
    pretrain(compose("pretrain", tiny_overrides(first, "trainer.max_steps=2")))
    ckpt = first / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    for extra, text in ((["method=simmim", "mask.unit=8"], "holds a method=mae model, this run is method=simmim"),
                        (["backbone.embed_dim=64"], "holds a backbone=vit_test model, this run is backbone=vit_test "
                                                    "(embed_dim 32 vs 64)")):
        with pytest.raises(SystemExit) as info:
            run_or_exit(lambda e=extra: pretrain(compose("pretrain", tiny_overrides(
                tmp_path / "other", f"ckpt_path={ckpt}", "resume_force=true", *e))))
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2, err
        assert len(err) == 1 and f"ckpt_path='{ckpt}'" in err[0] and text in err[0], err
