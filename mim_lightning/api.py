"""The Python API that the entry points use too: build the pieces of a run from a composed config.

    from mim_lightning import compose, build_pretrain_module
    cfg = compose("pretrain", ["method=mae", "backbone=vit_b"])
    module = build_pretrain_module(cfg)      # a LightningModule; module.model is a plain nn.Module
"""

from __future__ import annotations

import copy

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mim_lightning.callbacks.checkpoint import SeedPerRank, StopOnSignal, last_checkpoint
from mim_lightning.checkpoints.io import AtomicCheckpointIO, checkpoint_problem
from mim_lightning.instantiate import instantiate_checked, to_container
from mim_lightning.errors import ConfigError
from mim_lightning.masking import MaskGenerator
from mim_lightning.runchecks import check_run_values, check_trainer_values


def build_mask_generator(cfg: DictConfig) -> MaskGenerator | None:
    """The ``mask`` group's generator, or None when the method draws masks itself (``mask=null``).

    One instance serves a run: :func:`pretrain` hands the DataModule's generator to the model too
    (``build_pretrain_module(cfg, mask_generator=...)``), which draws with it when called with ``mask=None``.
    """
    node = cfg.get("mask")
    return None if node is None else instantiate_checked(node)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The ``data`` group's DataModule, with the ``mask`` group's generator in its transforms."""
    source = str(((cfg.data.get("source") or {}).get("_target_")) or "")
    if source.endswith("DemoSource") and cfg.data.get("root"):
        raise ConfigError("data.root", str(cfg.data.root), "data=folder (or data=imagefolder) together with data.root",
                          "data=demo (the embedded photos) reads no folder")
    return instantiate_checked(cfg.data, mask_generator=build_mask_generator(cfg))


def run_info() -> dict:
    """Code version of this run (git commit of the checkout, library versions), kept in the config."""
    import subprocess

    import lightning
    import timm
    import torch

    info: dict = {"torch": str(torch.__version__), "lightning": str(lightning.__version__), "timm": str(timm.__version__),
                  "git_commit": None, "git_dirty": None}
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def compile_kwargs(cfg: DictConfig) -> dict:
    """``torch.compile`` arguments of a run (``compile_kwargs``: backend, mode, dynamic, fullgraph, options)."""
    node = cfg.get("compile_kwargs")
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True))


def build_pretrain_module(cfg: DictConfig, mask_generator: MaskGenerator | None = None) -> pl.LightningModule:
    """The ``method`` group's pretraining LightningModule (``module.model`` is the plain model).

    The model receives ``mask_generator`` (default: a new :func:`build_mask_generator` of ``cfg``; pass the
    DataModule's to share the instance) for the masks it draws itself when called with ``mask=None``; with
    ``mask=null`` there is none and the model draws by its own default rule (the method's official one).
    The resolved config is stored in the module's hyper-parameters and so in every checkpoint.
    """
    generator = build_mask_generator(cfg) if mask_generator is None else mask_generator
    # only when there is one, so that a model that draws no masks of its own needs no such argument
    shared = {} if generator is None else {"model": {"mask_generator": generator}}
    factory = instantiate_checked(cfg.method, _partial_=True, _convert_="all", **shared)
    try:
        config = to_container(cfg)
        config["run_info"] = run_info()
        return factory(config=config, on_nonfinite=cfg.get("on_nonfinite", "stop"),
                       nonfinite_check_every_n_steps=cfg.get("nonfinite_check_every_n_steps", 50),
                       compile=bool(cfg.get("compile", False)), compile_kwargs=compile_kwargs(cfg))
    except Exception as exc:  # noqa: BLE001
        from mim_lightning.instantiate import as_config_error

        error = as_config_error(exc)
        if error is not None:
            raise error from None
        raise


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The ``callbacks`` group's callbacks (no progress bar with ``trainer.enable_progress_bar=false``), the
    per-rank seeding, the stop-signal handler and the start-of-run summary."""
    from lightning.pytorch.callbacks import ProgressBar

    from mim_lightning.callbacks.summary import RunSummary

    callbacks = [instantiate_checked(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    if (cfg.get("trainer") or {}).get("enable_progress_bar", True) is False:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks + [SeedPerRank(cfg.seed), StopOnSignal(), RunSummary(to_container(cfg))]


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate_checked(node) for node in (cfg.get("logger") or {}).values() if node is not None]


def build_trainer(cfg: DictConfig, **overrides) -> pl.Trainer:
    """The Lightning Trainer of the ``trainer`` group, with the run's callbacks and loggers.

    Checkpoints are written atomically; the DataModules shard data by rank themselves, so Lightning's
    sampler replacement is off.
    """
    node = cfg.trainer.get("strategy", "auto")
    strategy = str(node.get("_target_", "")) if isinstance(node, DictConfig) else str(node)
    # FSDP1 (trainer=fsdp1) writes its folders through its own checkpoint IO; FSDP2 (trainer=fsdp) writes sharded
    # folders atomically itself (FSDP2Strategy.save_checkpoint) and single files through AtomicCheckpointIO
    plugins = [] if strategy.endswith("FSDPStrategy") else [AtomicCheckpointIO()]
    loggers = build_loggers(cfg)
    kwargs = dict(callbacks=build_callbacks(cfg), logger=loggers if loggers else False, plugins=plugins,
                  use_distributed_sampler=False)
    kwargs.update(overrides)
    check_trainer_values(cfg.trainer)
    try:
        return instantiate_checked(cfg.trainer, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - Lightning rejects bad Trainer arguments with several types
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        cause = exc.__cause__ or exc
        if isinstance(cause, (MisconfigurationException, ValueError, TypeError)):
            message = " ".join(str(cause).split())
            raise ConfigError("trainer", "...", "valid Lightning Trainer arguments (see conf/trainer/*.yaml)",
                              f"Lightning says: {message}") from None
        raise


@rank_zero_only
def save_run_config(cfg: DictConfig, run_dir: str | os.PathLike, resuming: bool = False) -> Path:
    """Write the resolved config to ``<run_dir>/config.yaml`` (the exact settings of the run); a resumed run
    writes ``config.resume-<N>.yaml`` instead, so the original record is never overwritten."""
    from mim_lightning.resume import next_resume_config_path

    path = Path(run_dir) / "config.yaml"
    if resuming and path.exists():
        path = next_resume_config_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
    return path


def check_resume_keeps_run(cfg: DictConfig, ckpt_path: str) -> None:
    """A resume must not change what the checkpoint's run trains (the Python API's guard; the command line
    restores the stored config first, see :mod:`mim_lightning.resume`)."""
    from mim_lightning.resume import (check_checkpoint_model, checkpoint_config, identity_differences, move_paths,
                                      refuse_changes)

    check_checkpoint_model(to_container(cfg), ckpt_path)
    if cfg.get("resume_force", False):
        return
    stored = checkpoint_config(ckpt_path)
    if not stored:
        return
    stored = move_paths(stored, str(stored.get("run_dir", "")), str(cfg.run_dir))
    refuse_changes(identity_differences(stored, to_container(cfg)), str(ckpt_path))


RESUME_OPTIONS = ("null", "auto")


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where the run's checkpoints go (``callbacks.checkpoint.dirpath``, else ``<run_dir>/checkpoints``)."""
    node = (cfg.get("callbacks") or {}).get("checkpoint")
    if node is not None and node.get("dirpath"):
        return Path(str(node.dirpath))
    return Path(str(cfg.run_dir)) / "checkpoints"


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` (checked), or with ``resume=auto`` (or
    ``ckpt_path=last``) the newest usable checkpoint of this run folder, None to start fresh."""
    value = cfg.get("ckpt_path")
    resume = cfg.get("resume")
    if resume not in (None, "auto"):
        raise ConfigError("resume", resume, ", ".join(RESUME_OPTIONS))
    if value in (None, "", "null"):
        value = "last" if resume == "auto" else None
    if value is None:
        return None
    if str(value) == "last":
        found = last_checkpoint(checkpoint_dir(cfg))
        if found is None:
            print(f"[mim_lightning] no usable checkpoint in {checkpoint_dir(cfg)}; starting from scratch", flush=True)
        return None if found is None else str(found)
    path = Path(str(value)).expanduser()
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError("ckpt_path", str(value), "a complete Lightning checkpoint (.ckpt), or 'last'", problem)
    return str(path)


def continue_wandb_run(cfg: DictConfig, ckpt_path: str) -> None:
    """Point the W&B logger at the run id stored in the checkpoint, so a resume continues that run."""
    node = (cfg.get("logger") or {}).get("wandb")
    if node is None or node.get("id"):
        return
    import torch

    source = Path(ckpt_path) / "meta.pt" if Path(ckpt_path).is_dir() else ckpt_path  # sharded: the metadata file
    state = torch.load(source, map_location="cpu", weights_only=False, mmap=True).get("mim_lightning", {})
    if state.get("wandb_id"):
        from omegaconf import open_dict

        with open_dict(node):
            node.id = state["wandb_id"]
            node.resume = "allow"


def check_multirun_strategy(cfg: DictConfig) -> None:
    """A local ``-m`` sweep cannot use ``strategy=ddp``: Lightning starts the other ranks by re-running
    the command line, so every rank would run the whole sweep. ``ddp_spawn`` (or one SLURM job per point)
    gives each job its own process group."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launched = any(v in os.environ for v in ("SLURM_NTASKS", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"))
    if str(cfg.trainer.get("strategy")) == "ddp" and str(cfg.trainer.get("devices")) not in ("1",) and not launched:
        raise ConfigError("trainer.strategy", "ddp", "trainer.strategy=ddp_spawn in a local -m sweep, or "
                          "hydra/launcher=submitit_slurm (one SLURM task per GPU)",
                          "Lightning would re-run the whole sweep in every rank")


def pretrain(cfg: DictConfig) -> pl.Trainer:
    """Run (or resume, with ``ckpt_path``) the pretraining that ``cfg`` describes; returns the Trainer."""
    check_run_values(cfg)
    check_multirun_strategy(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return fit_run(cfg, build_datamodule, lambda datamodule, resuming: build_pretrain_module(
        cfg, mask_generator=datamodule.mask_generator), log_name="train")


def fit_run(cfg: DictConfig, make_datamodule, make_module, log_name: str = "train") -> pl.Trainer:
    """Build and fit one run: resolve the checkpoint to resume, check the data before any process is
    launched (``make_module(datamodule, resuming)`` builds the module), write the run config, and close the
    W&B run at the end. Run messages go to the console and ``<run_dir>/<log_name>.log``. The run holds
    ``<run_dir>/.lock`` throughout (:mod:`mim_lightning.runlock`): a second live run on the folder is refused."""
    from mim_lightning.runlock import run_dir_locked

    with run_dir_locked(cfg.run_dir):
        return _fit_locked(cfg, make_datamodule, make_module, log_name)


def _fit_locked(cfg: DictConfig, make_datamodule, make_module, log_name: str) -> pl.Trainer:
    from mim_lightning import runlog

    runlog.attach_run_log(str(cfg.run_dir), log_name)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        check_resume_keeps_run(cfg, ckpt_path)
        continue_wandb_run(cfg, ckpt_path)
    datamodule = make_datamodule(cfg)
    datamodule.setup("fit")  # finds bad data settings before any process is launched (idempotent)
    module = make_module(datamodule, ckpt_path is not None)
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:
        save_run_config(cfg, cfg.run_dir, resuming=ckpt_path is not None)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Exception as exc:  # noqa: BLE001 - recorded in the run log (sweep reports read it), then re-raised
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exc, SIGTERMException):
            runlog.error(f"run failed at step {trainer.global_step}: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:500]}")
        raise
    finally:
        finish_wandb_runs(trainer)
    return trainer


def finish_wandb_runs(trainer: pl.Trainer) -> None:
    """Close the W&B run, so the next run in this process (a sweep job, a notebook cell) gets its own."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers) and trainer.is_global_zero:
        import wandb

        wandb.finish()


def build_finetune_module(cfg: DictConfig, num_classes: int | None = None) -> pl.LightningModule:
    """The finetuning / linear-probing LightningModule of a composed ``conf/finetune.yaml``
    (``module.model`` is the plain classifier), with ``cfg.pretrained`` loaded into its encoder,
    compiled in place with ``compile=true``."""
    from mim_lightning.modules.finetune import build_finetune_module as build
    from mim_lightning.models.backbones.swin import use_sdpa_window_attention
    from mim_lightning.optim import compile_in_place

    try:
        module = build(cfg, num_classes)
        use_sdpa_window_attention(module.model)  # timm's Swin classifier: SDPA instead of an explicit softmax
        compile_in_place(module.model, bool(cfg.get("compile", False)), compile_kwargs(cfg))
        return module
    except Exception as exc:  # noqa: BLE001
        from mim_lightning.instantiate import as_config_error

        error = as_config_error(exc)
        if error is not None:
            raise error from None
        raise


def build_finetune_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The labelled DataModule of a composed ``conf/finetune.yaml``."""
    from mim_lightning.data.classification import build_classification_datamodule

    return build_classification_datamodule(cfg)


def finetune(cfg: DictConfig) -> pl.Trainer:
    """Run (or resume, with ``ckpt_path``) the finetuning or linear probing that ``cfg`` describes."""
    check_run_values(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    def make_module(datamodule, resuming: bool) -> pl.LightningModule:
        module_cfg = cfg
        if resuming and cfg.get("pretrained"):
            # The checkpoint holds every weight: the pretrained file is not read again (it may have moved).
            module_cfg = copy.deepcopy(cfg)
            module_cfg.pretrained = None
        from mim_lightning.modules.finetune import check_num_classes

        if cfg.get("num_classes") is not None:
            check_num_classes(cfg.num_classes, len(datamodule.classes))
        return build_finetune_module(module_cfg, num_classes=len(datamodule.classes))

    return fit_run(cfg, build_finetune_datamodule, make_module, log_name="finetune")
