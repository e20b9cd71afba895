"""Run defaults: the demo only when a run chooses nothing, each method's own recipe otherwise; resumes that
cannot change a run; one-line errors for key typos; each entry point's own --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mim_lightning import compose
from mim_lightning.config import is_demo_run

REPO = Path(__file__).resolve().parents[1]

#: What the demo experiment sets; no other run may carry any of it.
DEMO_VALUES = {"backbone.name": "vit_micro", "data.image_size": 64, "data.repeat": 16, "method.lr.base": 8.0e-3,
               "method.lr.warmup_epochs": 2, "callbacks.checkpoint.every_n_train_steps": 100,
               "callbacks.reconstructions.every_n_steps": 100, "trainer.log_every_n_steps": 5}


def readme_defaults() -> dict[str, dict[str, str]]:
    """The per-method defaults table of the README (between the method-defaults markers)."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- method-defaults:start -->")[1].split("<!-- method-defaults:end -->")[0]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table = {}
    for row in rows[2:]:
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        table[cells[0]] = dict(zip(header[1:], cells[1:]))
    return table


def select(cfg, key):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def lr_text(cfg) -> str:
    lr = cfg.method.lr
    if lr.value is not None:
        return f"{lr.value:g} absolute"
    return f"{lr.base:g} x batch / {lr.base_batch_size}"


CASES = [("mae", "vit_b"), ("simmim", "swin_b"), ("simmim", "vit_b"), ("mixmae", "swin_b"), ("itpn", "hivit_b"),
         ("itpn_clip", "hivit_b")]


@pytest.mark.parametrize("data", [None, "folder"])
@pytest.mark.parametrize("method,backbone", CASES)
def test_method_and_backbone_get_the_documented_defaults_and_nothing_of_the_demo(method, backbone, data):
    overrides = [f"method={method}", f"backbone={backbone}"] + ([f"data={data}", "data.root=/images"] if data else [])
    cfg = compose("pretrain", overrides)
    documented = readme_defaults()[f"{method} {backbone}"]
    assert str(cfg.data.image_size) == documented["image"]
    assert cfg.mask._target_.rsplit(".", 1)[1] == documented["mask"].split()[0]
    assert f"{cfg.mask.ratio:g}" == documented["mask"].split()[1]
    assert lr_text(cfg) == documented["lr"]
    assert f"{cfg.method.lr.warmup_epochs:g}" == documented["warm-up epochs"]
    assert str(cfg.trainer.max_epochs) == documented["epochs"]
    assert cfg.data.repeat == 1
    for key, value in DEMO_VALUES.items():
        assert select(cfg, key) != value, f"{key} carries the demo's value {value}"
    if data:
        assert cfg.data.source._target_.endswith("ImageFolderSource")


def test_simmim_swin_runs_at_192_with_window_6():
    from mim_lightning import build_pretrain_module

    cfg = compose("pretrain", ["method=simmim", "backbone=swin_t"])
    assert cfg.data.image_size == 192 and cfg.trainer.gradient_clip_val == 5.0
    model = build_pretrain_module(cfg).model
    assert model.encoder.layers[0].blocks[0].window_size == (6, 6) or \
        getattr(model.encoder.layers[0].blocks[0], "window_size", None) in (6, (6, 6))


def test_a_method_alone_picks_its_own_encoder():
    assert compose("pretrain", ["method=mixmae"]).backbone.name == "swin_b"
    assert compose("pretrain", ["method=itpn"]).backbone.name == "hivit_b"
    assert compose("pretrain", ["method=simmim", "backbone=vit_b"]).backbone.name == "vit_b"


def test_no_arguments_is_the_demo_as_make_train_runs_it():
    cfg = compose("pretrain", [])
    for key, value in DEMO_VALUES.items():
        assert select(cfg, key) == value
    assert cfg.data.source._target_.endswith("DemoSource")
    assert compose("pretrain", ["trainer.max_epochs=10"]).data.image_size == 64  # README: make train ARGS=...
    assert is_demo_run(["trainer.max_epochs=10", "mask.ratio=0.6"])
    assert not is_demo_run(["data.root=/x"]) and not is_demo_run(["experiment=null"])


def test_the_readme_api_snippet_gets_vit_b_at_224():
    cfg = compose("pretrain", ["method=mae", "backbone=vit_b"])
    assert cfg.backbone.name == "vit_b" and cfg.data.image_size == 224 and cfg.backbone.patch_size == 16


def test_paper_experiments_still_win_over_the_method_defaults():
    cfg = compose("pretrain", ["experiment=simmim_swin_b_in1k", "data.root=/x"])
    assert cfg.trainer.max_epochs == 800 and cfg.method.lr.base == 1.0e-4 and cfg.data.image_size == 192


# ----------------------------------------------------------------------------------------- command line


def cli(*args: str, cwd: Path, app: str = "train", timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", f"mim_lightning.{app}", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mim_lightning: error: ")
    return lines[0]


TINY = ["experiment=null", "backbone=vit_test", "trainer=cpu", "data=folder", "data.image_size=32", "data.batch_size=4",
        "data.num_workers=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "callbacks.checkpoint.every_n_train_steps=1"]


def test_key_typo_is_one_line_with_a_close_key(tmp_path):
    line = one_error_line(cli("data.imagesize=32", cwd=tmp_path))
    assert "data.imagesize" in line and "did you mean data.image_size" in line
    line = one_error_line(cli("trainer.max_steps=ten", f"run_dir={tmp_path / 'r'}", cwd=tmp_path))
    assert "trainer.max_steps" in line and "'ten'" in line


def test_help_lists_only_each_apps_own_options(tmp_path):
    train = cli("--help", cwd=tmp_path)
    assert train.returncode == 0 and "mae_vit_b_in1k" in train.stdout and "finetune_mae_vit_b_in1k" not in train.stdout
    finetune = cli("--help", cwd=tmp_path, app="finetune")
    assert finetune.returncode == 0 and "finetune_mae_vit_b_in1k" in finetune.stdout
    assert not re.search(r"(?<!finetune_)simmim_swin_b_in1k", finetune.stdout) and "pretrained=" in finetune.stdout
    export = cli("--help", cwd=tmp_path, app="export")
    assert export.returncode == 0 and "ckpt=" in export.stdout
    line = one_error_line(cli("experiment=mae_vit_b_in1k", cwd=tmp_path, app="finetune"))
    assert "experiment='mae_vit_b_in1k'" in line and "pretrain recipe" in line
    line = one_error_line(cli("experiment=finetune_mae_vit_b_in1k", cwd=tmp_path))
    assert "finetune recipe" in line


def test_resume_restores_the_run_refuses_changes_and_keeps_the_record(tmp_path, image_folder):
    run = tmp_path / "run"
    first = cli(*TINY, f"data.root={image_folder}", "trainer.max_steps=2", f"run_dir={run}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "run summary" in log and "image size: 32 px" in log and "checkpoints:" in log
    original = (run / "config.yaml").read_bytes()
    overrides = (run / ".hydra" / "overrides.yaml").read_bytes()

    # a changed model/data key is refused, naming the key and its stored value
    line = one_error_line(cli("resume=auto", f"run_dir={run}", "data.image_size=64", cwd=tmp_path))
    assert "data.image_size: stored 32, given 64" in line and "resume_force=true" in line
    # the original command line repeated with a different backbone is refused too
    line = one_error_line(cli(*TINY, f"data.root={image_folder}", "backbone=vit_micro", "resume=auto",
                              f"run_dir={run}", cwd=tmp_path))
    assert "backbone.name: stored 'vit_test', given 'vit_micro'" in line

    # no other overrides but a longer run: the stored config continues (folder data, not the demo photos)
    longer = cli("resume=auto", f"run_dir={run}", "trainer.max_steps=4", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "trainer.max_steps changed from 2 to 4" in longer.stderr and "re-planned" in longer.stderr
    resumed = yaml.safe_load((run / "config.resume-1.yaml").read_text())
    assert resumed["trainer"]["max_steps"] == 4 and resumed["data"]["root"] == str(image_folder)
    assert (run / "config.yaml").read_bytes() == original
    assert (run / ".hydra" / "overrides.yaml").read_bytes() == overrides
    import torch

    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4

    forced = cli("resume=auto", f"run_dir={run}", "trainer.max_steps=5", "method.lr.base=1e-3", "resume_force=true",
                 cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert (run / "config.resume-2.yaml").is_file()


@pytest.mark.parametrize("how", ["move", "copy"])
def test_resume_of_a_moved_or_copied_run_folder_writes_into_the_new_folder(tmp_path, image_folder, how):
    import shutil

    import torch

    old = tmp_path / "old"
    assert cli(*TINY, f"data.root={image_folder}", "trainer.max_steps=2", f"run_dir={old}", cwd=tmp_path).returncode == 0
    new = tmp_path / "moved"
    if how == "move":
        shutil.move(str(old), str(new))
    else:  # cp -a: the original stays, the copy continues
        shutil.copytree(old, new, symlinks=True)
    result = cli("resume=auto", f"run_dir={new}", "trainer.max_steps=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert old.exists() == (how == "copy")
    assert torch.load(new / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    assert not list((new / "checkpoints").glob("last-v*.ckpt"))


def test_api_resume_refuses_a_changed_run(tmp_path, image_folder):
    from mim_lightning.api import pretrain
    from mim_lightning.errors import ConfigError

    base = [*TINY, f"data.root={image_folder}", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=1",
            "~callbacks.progress_bar"]
    pretrain(compose("pretrain", base))
    with pytest.raises(ConfigError, match=re.escape("mask.ratio: stored 0.75, given 0.5")):
        pretrain(compose("pretrain", [*base, "mask.ratio=0.5", "resume=auto"]))
