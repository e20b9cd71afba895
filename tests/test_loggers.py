"""metrics.csv of resumed runs: each step once, nothing lost to a kill -9."""

import csv
import signal
from collections import Counter

import pytest

from conftest import tiny_overrides, write_images
from mim_lightning import ConfigError, compose, pretrain
from mim_lightning.loggers import AppendingCSVLogger


def read_rows(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def assert_each_step_once(rows, steps):
    """train/loss at exactly ``steps``, and no (step, metric set) row twice."""
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(steps)
    sets = Counter((r["step"], tuple(k for k, v in r.items() if v and k != "step")) for r in rows)
    assert max(sets.values()) == 1, [key for key, count in sets.items() if count > 1]


def test_the_first_logged_step_drops_the_later_rows_and_a_cut_off_row(tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    lines = ["epoch,step,train/loss"] + [f"0,{step},{step / 10}" for step in range(6)]
    (folder / "metrics.csv").write_text("\r\n".join(lines) + "\r\n0,6,0.")  # killed while writing step 6
    logger = AppendingCSVLogger(save_dir=str(tmp_path), name="", version="csv")
    logger.log_metrics({"train/loss": 9.0, "val/loss": 1.0}, step=4)
    logger.log_metrics({"train/loss": 8.0}, step=5)
    rows = read_rows(folder / "metrics.csv")  # written as logged, no flush needed
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "0.0"), ("1", "0.1"), ("2", "0.2"), ("3", "0.3"),
                                                             ("4", "9.0"), ("5", "8.0")]
    assert rows[4]["val/loss"] == "1.0" and rows[0]["epoch"] == "0"  # old and new columns kept


def resume_overrides(folder, run_dir, *extra):
    return tiny_overrides(run_dir, "experiment=null", "data=folder", f"data.root={folder}", "data.val_fraction=0.25",
                          "data.val_min_images=0",
                          "~callbacks.reconstructions", "trainer.max_epochs=3",
                          "callbacks.checkpoint.every_n_train_steps=2", *extra)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_images(root, 16)  # 12 training images x repeat 2 / batch 4: 6 steps per epoch
    return root


def test_resume_from_an_older_checkpoint_leaves_each_step_once(tmp_path, folder):
    run_dir = tmp_path / "run"
    pretrain(compose("pretrain", resume_overrides(folder, run_dir, "trainer.max_steps=5")))
    assert_each_step_once(read_rows(run_dir / "csv" / "metrics.csv"), range(5))
    (run_dir / "checkpoints" / "last.ckpt").unlink()  # resume=auto now picks step 4's snapshot: step 4 is redone
    trainer = pretrain(compose("pretrain", resume_overrides(folder, run_dir, "trainer.max_steps=8", "resume=auto")))
    assert trainer.global_step == 8
    rows = read_rows(run_dir / "csv" / "metrics.csv")
    assert_each_step_once(rows, range(8))
    assert [r["step"] for r in rows if r.get("val/loss")] == ["5"]  # the epoch-end validation, once


def test_kill_9_after_a_checkpoint_then_resume_keeps_every_step(tmp_path, folder):
    from test_reliability import run_cli

    run_dir = tmp_path / "killed"
    killed = run_cli(*resume_overrides(folder, run_dir, "trainer.max_steps=8",
                                       "+callbacks.kill._target_=conftest.SignalAtStep", "+callbacks.kill.step=7"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # step 6 (after the step-6 checkpoint) reached the disk before the kill; the resumed run logs it again
    assert_each_step_once(read_rows(run_dir / "csv" / "metrics.csv"), range(7))
    pretrain(compose("pretrain", resume_overrides(folder, run_dir, "trainer.max_steps=8", "resume=auto")))
    assert_each_step_once(read_rows(run_dir / "csv" / "metrics.csv"), range(8))


@pytest.fixture
def no_wandb_setup(tmp_path, monkeypatch):
    """No WANDB_MODE, no key in the environment or in a netrc file."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_wandb_without_a_key_is_one_line_and_exit_2(tmp_path, capsys, no_wandb_setup):
    import time

    from mim_lightning.cli import run_or_exit

    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        run_or_exit(lambda: pretrain(compose("pretrain", tiny_overrides(tmp_path / "run", "logger=wandb"))))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("mim_lightning: error: logger='wandb': no W&B API key"), err
    assert time.monotonic() - start < 60


def test_wandb_falls_back_to_offline_at_once_when_the_server_does_not_answer(tmp_path, monkeypatch, caplog,
                                                                               no_wandb_setup):
    import socket
    import time

    from mim_lightning.loggers import WandbLogger, wandb_offline

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with socket.socket() as server:  # a port that refuses connections
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    logger = WandbLogger(project="p", save_dir=str(tmp_path))
    assert logger._offline and time.monotonic() - start < 5
    assert f"logging offline to {tmp_path}/wandb; upload later with `wandb sync {tmp_path}/wandb/offline-run-*`" \
        in caplog.text
    monkeypatch.setenv("WANDB_MODE", "online")  # asked for online: one line instead of waiting
    with pytest.raises(ConfigError, match="does not answer within 2 s"):
        wandb_offline(False, str(tmp_path))
    # the real server from a machine without network: decided within the probe's 2 s, whatever the DNS does
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_BASE_URL")
    start = time.monotonic()
    wandb_offline(False, str(tmp_path))
    assert time.monotonic() - start < 5
