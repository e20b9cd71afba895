"""Value checks of a composed run config, made before anything is built (one-line :class:`ConfigError`s).

Lightning, torch and the DataModule would reject these values late (a bare ``TypeError``, a traceback from
``seed_everything``) or accept them silently (``data.repeat=0`` trains on nothing, ``data.hflip=2`` flips always).
:func:`check_run_values` runs first in :func:`mim_lightning.api.pretrain` and :func:`mim_lightning.api.finetune`;
the data keys are checked here, at the config level, so the DataModule code stays as it is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mim_lightning.errors import ConfigError

#: ``seed_everything`` and numpy take seeds in ``[0, 2**32 - 1]``.
SEED_MAX = 2**32 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(key: str, value: Any, low: int, allowed: str | None = None) -> None:
    if not _is_int(value) or value < low:
        raise ConfigError(key, value, allowed or f"an integer >= {low}")


def check_seed(value: Any) -> None:
    if not _is_int(value) or not 0 <= value <= SEED_MAX:
        raise ConfigError("seed", value, f"an integer from 0 to {SEED_MAX} (2**32 - 1)")


def check_writable_folder(key: str, path: str | os.PathLike, what: str) -> None:
    """``path`` can be created (if missing) and written: a file is created and removed in it."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(key, str(path), f"a folder this user can create and write ({what})",
                          f"cannot write there: {reason}") from None


#: Trainer keys that must be integers, with their smallest allowed value (None is allowed where Lightning takes it).
TRAINER_INT_KEYS = {"max_epochs": -1, "max_steps": -1, "accumulate_grad_batches": 1, "log_every_n_steps": 1,
                    "num_nodes": 1, "check_val_every_n_epoch": 1, "num_sanity_val_steps": -1}


def check_trainer_values(trainer_cfg: DictConfig) -> None:
    """One-line errors for the Trainer values Lightning would reject with a bare TypeError or accept silently."""
    for key, low in TRAINER_INT_KEYS.items():
        if trainer_cfg.get(key) is not None:
            check_int(f"trainer.{key}", trainer_cfg.get(key), low)
    clip = trainer_cfg.get("gradient_clip_val")
    if clip is not None and (not _is_number(clip) or clip < 0):
        raise ConfigError("trainer.gradient_clip_val", clip, "null (no clipping) or a number >= 0, e.g. 5.0")


def check_data_values(data: DictConfig | None) -> None:
    """``data.repeat``, ``data.hflip``, ``data.batch_size`` (the DataModule checks the rest)."""
    if data is None:
        return
    if data.get("repeat") is not None:
        check_int("data.repeat", data.get("repeat"), 1, "an integer >= 1 (passes over the images per epoch)")
    hflip = data.get("hflip")
    if hflip is not None and (not _is_number(hflip) or not 0 <= hflip <= 1):
        raise ConfigError("data.hflip", hflip, "a probability from 0 to 1 (0.5: half the crops flipped)")


def check_model_values(cfg: DictConfig) -> None:
    backbone = cfg.get("backbone")
    if isinstance(backbone, DictConfig):
        for key in ("depth", "embed_dim", "patch_size"):
            if backbone.get(key) is not None:
                check_int(f"backbone.{key}", backbone.get(key), 1)
        depths = backbone.get("depths")  # hierarchical encoders: blocks per stage
        if depths is not None and (not all(_is_int(d) and d >= 0 for d in depths) or not sum(depths)):
            raise ConfigError("backbone.depths", list(depths), "non-negative integers per stage, at least one block")
    for group in ("method", "finetune"):
        lr = (cfg.get(group) or {}).get("lr") if isinstance(cfg.get(group), DictConfig) else None
        if not isinstance(lr, DictConfig):
            continue
        value = lr.get("value")
        if value is not None and (not _is_number(value) or value <= 0):
            raise ConfigError(f"{group}.lr.value", value, "null (the linear scaling rule) or a learning rate > 0")
        base = lr.get("base")
        if base is not None and (not _is_number(base) or base <= 0):
            raise ConfigError(f"{group}.lr.base", base, "a base learning rate > 0")


def check_callback_values(cfg: DictConfig) -> None:
    node = (cfg.get("callbacks") or {}).get("checkpoint")
    if node is None:
        return
    every = node.get("every_n_train_steps")
    if every is not None:
        check_int("callbacks.checkpoint.every_n_train_steps", every, 1,
                  "an integer >= 1 (optimizer steps between checkpoints), or null")


def check_run_values(cfg: DictConfig, folders: bool = True) -> None:
    """Every check of this module: the Trainer's integer and clipping values, and (``folders``) that the run
    folder and ``MIM_LIGHTNING_CACHE`` can be written (created if missing)."""
    check_seed(cfg.get("seed"))
    check_trainer_values(cfg.trainer)
    check_data_values(cfg.get("data"))
    check_model_values(cfg)
    check_callback_values(cfg)
    if cfg.get("num_classes") is not None:  # finetuning; the class folders are counted at setup
        from mim_lightning.modules.finetune import check_num_classes

        check_num_classes(cfg.num_classes)
    if not folders:
        return
    check_writable_folder("run_dir", str(cfg.run_dir), "the run folder")
    cache = os.environ.get("MIM_LIGHTNING_CACHE")
    if cache:
        check_writable_folder("MIM_LIGHTNING_CACHE", cache, "the environment variable naming the download cache")
