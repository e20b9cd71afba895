"""What the entry points share: argument checks before Hydra, ``--help``, resumes, one-line errors, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from mim_lightning.config import (GROUPS, as_config_error, check_group_choices, compose, group_options,
                                  normalize_overrides, searchpath_override, with_default_experiment,
                                  with_pretrained_encoder)
from mim_lightning.errors import ConfigError

EXIT_CONFIG_ERROR = 2
EXIT_RUN_FAILED = 1

#: The config groups each app composes, with what they choose.
APP_GROUPS = {
    "pretrain": ("method", "backbone", "mask", "data", "trainer", "logger", "callbacks", "experiment"),
    "finetune": ("method", "backbone", "data", "trainer", "logger", "callbacks", "experiment"),
}
#: The log file each app writes in its run folder (Hydra's job name).
APP_LOG = {"pretrain": "train", "finetune": "finetune"}


def fail(message: str, code: int) -> None:
    print(f"mim_lightning: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def experiment_app(name: str) -> str:
    """Which app an experiment belongs to: ``finetune_*`` recipes are finetuning ones, the rest pretraining."""
    return "finetune" if name.startswith("finetune_") else "pretrain"


def experiments_for(app: str) -> list[str]:
    return [name for name in group_options("experiment") if experiment_app(name) == app]


def check_argv(argv: list[str], app: str = "pretrain") -> None:
    """Reject unknown ``group=option`` choices, and experiments of the other app, before Hydra reports them."""
    try:
        check_group_choices(argv)
        for arg in argv:
            key, sep, value = arg.partition("=")
            if sep and key.lstrip("+") == "experiment":
                for name in (v.strip() for v in value.split(",")):
                    if name and name not in ("null", "None") and experiment_app(name) != app:
                        raise ConfigError("experiment", name, ", ".join(experiments_for(app)),
                                          f"a {experiment_app(name)} recipe, not a {app} one")
    except ConfigError as error:
        fail(str(error), EXIT_CONFIG_ERROR)


def _is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def _overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` / ``group=option`` arguments (no flags, no Hydra's own settings)."""
    return [a for a in argv if not a.startswith("-") and not a.startswith(("hydra.", "hydra/"))
            and ("=" in a or a.startswith("~"))]


#: Hydra's flags that take the next argument as their value.
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc")


def check_split_values(argv: list[str]) -> None:
    """A word that is no ``key=value`` after an override is a value the shell split at a space (an unquoted
    path with spaces); Hydra would say "missing EQUAL at '<EOF>'"."""
    for previous, arg in zip(["", *argv], argv):
        if "=" in arg or arg.startswith(("-", "~")) or previous in VALUE_FLAGS or "=" not in previous:
            continue
        key, _, value = previous.partition("=")
        fail(str(ConfigError(key.lstrip("+"), f"{value} {arg}", f"the whole value in quotes: '{key}={value} {arg}'",
                             f"the shell split the value at a space ({arg!r} is not key=value)")), EXIT_CONFIG_ERROR)


def precheck(app: str, argv: list[str]) -> None:
    """Compose once before Hydra does, so a bad key (a typo) or value is one line with exit 2.

    The run folder is tested for writing only when the command line names it (the default one is named after
    the time, which Hydra reads again)."""
    check_split_values(argv)
    overrides = _overrides(argv)
    if _is_multirun(argv) or any("," in a.partition("=")[2] and "[" not in a for a in overrides):
        return  # sweep values: Hydra expands them per job
    if any(a.startswith(("--cfg", "-c", "--info", "--help", "-h", "--hydra-help", "--shell-completion")) for a in argv):
        return
    from mim_lightning.runchecks import check_run_values

    named = any(a.partition("=")[0].lstrip("+") == "run_dir" for a in overrides)
    try:
        check_run_values(compose(app, overrides), folders=named)
    except ConfigError as error:
        fail(str(error), EXIT_CONFIG_ERROR)


def _with_added(argv: list[str], expand) -> list[str]:
    """``argv`` with the overrides that ``expand(overrides) -> [*added, *overrides]`` prepends, put among the other
    overrides (argparse wants them together: "-m a=1 b=2"), else last (after "--cfg job"); ``expand`` runs once."""
    overrides = _overrides(argv)
    expanded = expand(overrides)
    added = expanded[: len(expanded) - len(overrides)]
    at = next((i for i, a in enumerate(argv) if not a.startswith("-") and ("=" in a or a.startswith("~"))), len(argv))
    return [*argv[:at], *added, *argv[at:]]


def prepare_argv(app: str, argv: list[str]) -> list[str]:
    """Normalize ``group=null``, add the demo experiment where it applies, and check choices and keys."""
    argv = _with_added(normalize_overrides(argv, app), lambda overrides: with_default_experiment(app, overrides))
    if not _is_multirun(argv):  # finetuning a project checkpoint: its method and backbone unless given
        try:
            argv = _with_added(argv, lambda overrides: with_pretrained_encoder(app, overrides))
        except ConfigError as error:
            fail(str(error), EXIT_CONFIG_ERROR)
    check_argv(argv, app)
    precheck(app, argv)
    return [*argv, *searchpath_override()] if not any(a.startswith("hydra.searchpath") for a in argv) else argv


def resume_requested(argv: list[str]) -> bool:
    for arg in _overrides(argv):
        key, _, value = arg.partition("=")
        if (key == "resume" and value == "auto") or (key == "ckpt_path" and value not in ("", "null", "None")):
            return True
    return False


def restore_or_none(app: str, argv: list[str]):
    """The stored config a command-line resume continues (see :mod:`mim_lightning.resume`), or None."""
    from mim_lightning.resume import restore_run_config

    if _is_multirun(argv) or not resume_requested(argv):
        return None
    try:
        return restore_run_config(app, normalize_overrides(_overrides(argv), app), APP_GROUPS[app])
    except ConfigError as error:
        fail(str(error), EXIT_CONFIG_ERROR)
    return None


def print_help(app: str) -> None:
    """``--help``: this app's groups and options, its required keys and a few examples."""
    module = "train" if app == "pretrain" else "finetune"
    lines = [f"usage: python -m mim_lightning.{module} [group=option ...] [key=value ...]", ""]
    if app == "pretrain":
        lines += ["Self-supervised pretraining. With none of method=, backbone=, data= or experiment= it is the demo",
                  "(experiment=demo: MAE, vit_micro, 64 px, the embedded photos); any other run gets the method's own",
                  "defaults (conf/recipe/<method>.yaml), then the experiment, then the command line.", ""]
    else:
        lines += ["Finetuning or linear probing of a pretrained encoder (mode=finetune|linear_probe).", ""]
    lines.append("Config groups (group=option):")
    for group in APP_GROUPS[app]:
        options = experiments_for(app) if group == "experiment" else group_options(group)
        if app == "finetune" and group == "method":
            options = group_options("finetune")
        lines.append(f"  {group:<11} {', '.join(options)}")
    lines += ["", "Keys you usually set:"]
    if app == "pretrain":
        lines += ["  data.root=PATH          required with data=folder|imagefolder (your images)",
                  "  run_dir=PATH            the run folder (default outputs/<date>/<time>)",
                  "  resume=auto             continue the run in run_dir from its newest checkpoint",
                  "  seed=0, trainer.max_epochs=N, data.batch_size=N, data.image_size=N, mask.ratio=R",
                  "", "Examples:",
                  "  python -m mim_lightning.train                                    # the demo",
                  "  python -m mim_lightning.train method=mae backbone=vit_b data=folder data.root=/data/images",
                  "  python -m mim_lightning.train experiment=mae_vit_b_in1k data.root=/data/imagenet/train",
                  "  python -m mim_lightning.train -m mask.ratio=0.4,0.6,0.75          # a sweep"]
    else:
        lines += ["  data.root=PATH          required: one sub-folder of images per class",
                  "  pretrained=PATH         a pretraining checkpoint (.ckpt), an official .pth or an exported encoder",
                  "  method=M backbone=B     the pretraining method and encoder of those weights",
                  "  mode=finetune|linear_probe, val_root=PATH, num_classes=N, run_dir=PATH, resume=auto",
                  "", "Examples:",
                  "  python -m mim_lightning.finetune method=mae backbone=vit_b pretrained=run/checkpoints/last.ckpt \\",
                  "      data.root=/data/train val_root=/data/val",
                  "  python -m mim_lightning.finetune experiment=finetune_mae_vit_b_in1k pretrained=... data.root=..."]
    lines += ["", "Show the composed config: --cfg job [--resolve]. Hydra's own options: --hydra-help."]
    print("\n".join(lines))


def entry_point(app: str, hydra_main: Callable[[], Any], run: Callable[[Any], Any]) -> None:
    """The body of ``python -m mim_lightning.train|finetune``.

    ``--help`` prints this app's help; a resume of a stored run continues its stored config without
    recomposing it (Hydra does not write ``.hydra/`` over the original run's record); everything else goes
    through Hydra (``hydra_main``), after the arguments were checked.
    """
    from mim_lightning import runlog

    argv = sys.argv[1:]
    if any(a in ("--help", "-h") for a in argv):
        print_help(app)
        sys.exit(0)
    restored = restore_or_none(app, argv)  # the stored run, before any default (the demo) is added
    if restored is None:
        argv = prepare_argv(app, argv)
    else:
        cfg, notes = restored
        lock_or_exit(str(cfg.run_dir))
        runlog.attach_run_log(str(cfg.run_dir), APP_LOG[app])
        for note in notes:
            runlog.info(note)
        run_or_exit(run, cfg)
        return
    named = [a.partition("=")[2] for a in _overrides(argv) if a.partition("=")[0].lstrip("+") == "run_dir"]
    if named and not _is_multirun(argv) and not any(a.startswith(("--cfg", "-c", "--info")) for a in argv):
        lock_or_exit(named[-1])  # before Hydra writes <run_dir>/.hydra over a live run's record
    sys.argv = [sys.argv[0], *argv]
    hydra_main()


def lock_or_exit(run_dir: str) -> None:
    """Hold ``<run_dir>/.lock`` for this process (:mod:`mim_lightning.runlock`), or one line and exit 2."""
    from mim_lightning.runlock import lock_run_dir

    try:
        lock_run_dir(run_dir)
    except ConfigError as error:
        fail(str(error), EXIT_CONFIG_ERROR)


def run_or_exit(function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function``; a config problem prints one line and exits 2, a non-finite loss exits 1,
    SIGTERM/SIGUSR1/Ctrl-C during training (after ``last.ckpt`` is written) exits 0, Ctrl-C before it 130."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from mim_lightning.errors import DiskFullError, NonFiniteLossError

    try:
        return function(*args)
    except SIGTERMException:
        run_dir = getattr(args[0], "run_dir", None) if args else None
        where = f"resume=auto run_dir={run_dir}" if run_dir else "resume=auto run_dir=<this run>"
        print(f"mim_lightning: stopped by a signal; last.ckpt was written, resume with {where}",
              file=sys.stderr, flush=True)
        sys.exit(0)
    except KeyboardInterrupt:  # Ctrl-C before training started (during training it stops as above)
        print("mim_lightning: interrupted before training started; no checkpoint was written", file=sys.stderr,
              flush=True)
        sys.exit(130)
    except (NonFiniteLossError, DiskFullError) as error:
        fail(error.strerror if isinstance(error, DiskFullError) else str(error), EXIT_RUN_FAILED)
    except Exception as exc:  # noqa: BLE001 - anything that is not a config problem keeps its traceback
        error = as_config_error(exc)
        if error is None:
            raise
        fail(str(error), EXIT_CONFIG_ERROR)


__all__ = ["EXIT_CONFIG_ERROR", "EXIT_RUN_FAILED", "GROUPS", "entry_point", "fail", "run_or_exit"]
