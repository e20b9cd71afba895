"""The README cannot drift: every Python block runs, every command composes, and the CPU commands run
(with ``trainer.fast_dev_run=2`` appended where they train) on folders the test makes."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mim_lightning import compose

from conftest import write_images

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

#: Commands the test does not run, by a prefix of the command, and why. Anything else that is not run is composed.
NOT_RUN = {
    "make ": "the Makefile targets themselves (make test is this suite; make train is the demo command run below)",
    "python scripts/reproduce_small.py": "the study; its --quick path runs in tests/test_reproduce_small.py (slow)",
    "python scripts/benchmark.py": "the benchmark; its paths run in tests/test_benchmark.py",
    "torchrun ": "multi-node launch (its mim_lightning.train part is composed)",
    "srun ": "SLURM launch (its mim_lightning.train part is composed)",
    "...": "a continuation shown as a fragment of the command above",
}
#: Marks of a command that needs hardware or data this machine does not have: composed, not run.
NEEDS_MORE = ("experiment=", "trainer=gpu", "trainer=ddp", "trainer=fsdp", "trainer.devices=", "trainer.num_nodes=",
              "hydra/launcher=", "--device cuda", "data=hf", "<same ", "teacher.checkpoint=", "pretrained=")


def bash_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readme")
    images = root / "images"
    write_images(images, 12, size=48, seed=3)
    classes = root / "classes"
    for label, name in enumerate(["cat", "dog", "emu"]):
        write_images(classes / name, 8, size=48, seed=20 + label, prefix=name)
    return {"root": root, "images": images, "classes": classes}


def substitute(command: str, folders: dict[str, Path], checkpoint: Path | None = None) -> str:
    """Placeholders and example paths of the README -> the test's own folders and files."""
    command = command.replace("/path/to/images", str(folders["images"]))
    command = command.replace("outputs/<run>/checkpoints/last.ckpt", str(checkpoint or "last.ckpt"))
    command = command.replace("/data/in1k-shards", str(folders["root"] / "shards"))
    command = command.replace("/tmp/q", str(folders["root"] / "q"))
    command = re.sub(r"/(?:data|path/to)/[\w./-]+", str(folders["classes"]), command)
    command = re.sub(r"=\.\.\.(?=\s|$)", f"={folders['classes']}", command)
    command = re.sub(r"<same [^>]*>", "", command)  # "the same overrides as before": the rest must compose
    return re.sub(r"<[^>]+>", str(folders["root"] / "placeholder"), command)


def app_arguments(command: str) -> tuple[str, list[str]] | None:
    """(app, overrides) of a ``python -m mim_lightning.train|finetune`` command, wherever it sits in the line."""
    match = re.search(r"-m mim_lightning\.(train|finetune)\b(.*)$", command)
    if match is None:
        return None
    app = "pretrain" if match.group(1) == "train" else "finetune"
    args = [a for a in shlex.split(match.group(2))
            if a not in ("-m", "--multirun", "...") and not a.startswith("hydra")]
    first_points = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and "," in value and not value.startswith(("[", "'", '"', "$")):
            value = value.split(",")[0]  # the first point of a sweep
        first_points.append(f"{key}{sep}{value}")
    return app, first_points


def run(command: str, cwd: Path, monkeypatch, timeout: int = 300) -> tuple[int, str]:
    """Run a README command: the mim_lightning entry points in this process (as ``python -m`` would, without
    paying the import of torch and Lightning per command), everything else as a subprocess."""
    import contextlib
    import importlib
    import io

    args = shlex.split(command)
    if args[:2] == ["python", "-m"] and args[2].startswith("mim_lightning."):
        module = importlib.import_module(args[2])
        stderr = io.StringIO()
        code = 0
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", [args[2], *args[3:]])
            patch.chdir(cwd)
            try:
                with contextlib.redirect_stderr(stderr):
                    module.main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        return code, stderr.getvalue()
    if args[0] == "python":
        args[0] = sys.executable
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stderr


def is_run(command: str) -> bool:
    if any(command.startswith(prefix) for prefix in NOT_RUN):
        return False
    return not any(mark in command for mark in NEEDS_MORE)


def test_every_command_is_classified_and_every_app_command_composes(folders):
    commands = bash_commands()
    assert len(commands) > 30
    composed = 0
    for command in commands:
        arguments = app_arguments(substitute(command, folders))
        if arguments is not None:
            app, overrides = arguments
            compose(app, overrides)  # raises ConfigError on a key or option that no longer exists
            composed += 1
        else:
            assert command.startswith(("python scripts/", "python -m mim_lightning.export", *NOT_RUN)), command
            script = re.match(r"python (scripts/\S+)", command)
            if script:
                assert (REPO / script.group(1)).is_file(), command
    assert composed > 25


RUN_COMMANDS = list(dict.fromkeys(c for c in bash_commands() if is_run(c)))  # README order, each once


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict:
    """One working folder for the CPU commands, in README order: later ones (export, sweep report) read what
    earlier ones wrote."""
    return {"cwd": tmp_path_factory.mktemp("readme_cwd"), "checkpoint": None, "ran": []}


def test_the_cpu_command_list_covers_the_readme():
    assert "python -m mim_lightning.train" in RUN_COMMANDS, "the demo command must run"
    for needle in ("mim_lightning.export", "sweep_report", "visualize_masks", "make_shards", "method=itpn_clip"):
        assert any(needle in c for c in RUN_COMMANDS), needle
    assert len(RUN_COMMANDS) >= 12


#: Commands on your own images run the paper-size encoders (ViT-B, Swin-B at 224 px): minutes on 2 cores, so they
#: run with ``make test-all`` (marked slow); the fast suite composes them (above) and runs every other one.
RUN_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if "data.root=" in c else c for c in RUN_COMMANDS]


@pytest.mark.parametrize("command", RUN_PARAMS)
def test_the_cpu_commands_run(command, folders, workdir, monkeypatch):
    """Every command that this 2-core CPU can run: train and finetune commands with fast_dev_run=2 (224 px
    ones with batch 2), then the scripts and the export on what they wrote."""
    cwd = workdir["cwd"]
    line = substitute(command, folders, workdir["checkpoint"])
    line = re.sub(r"^python (scripts/)", rf"python {REPO}/\1", line)
    if "-m mim_lightning.train" in line or "-m mim_lightning.finetune" in line:
        line += " trainer.fast_dev_run=2 trainer.enable_progress_bar=false"
        if "data.root=" in line:
            line += " data.batch_size=2 data.num_workers=0"  # 224 px ViT-B on 2 cores: a small batch
        if " -m " not in line.split("mim_lightning.")[1] and "run_dir=" not in line:
            line += f" run_dir={cwd / ('run%d' % len(workdir['ran']))}"
    if "mim_lightning.export" in line:
        assert workdir["checkpoint"] is not None, "an earlier README command writes the checkpoint to export"
    code, stderr = run(line, cwd, monkeypatch)
    assert code == 0, f"{line}\n{stderr[-3000:]}"
    workdir["ran"].append(command)
    if "-m mim_lightning.train" in line and workdir["checkpoint"] is None and "run_dir=" in line:
        found = Path(line.split("run_dir=")[1].split()[0]) / "checkpoints" / "last.ckpt"
        workdir["checkpoint"] = found if found.is_file() else None


def test_every_python_block_runs(tmp_path, monkeypatch):
    import torch

    from mim_lightning import build_pretrain_module

    # A stand-in for the official full MAE file: the official key layout is this model's keys without the
    # encoder./decoder. prefixes (what convert_official("mae") adds back; the layout itself is tested in
    # tests/test_checkpoints.py).
    model = build_pretrain_module(compose("pretrain", ["method=mae", "backbone=vit_b"])).model
    official = {key.split(".", 1)[1]: value.to(torch.bfloat16) for key, value in model.state_dict().items()}
    torch.save({"model": official}, tmp_path / "mae_visualize_vit_base.pth")
    del model, official
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
