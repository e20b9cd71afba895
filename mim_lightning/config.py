"""Hydra composition for notebooks, tests and the entry points.

``compose("pretrain", ["method=mae", "backbone=vit_b"])`` returns the same config that
``python -m mim_lightning.train method=mae backbone=vit_b`` runs with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mim_lightning.errors import ConfigError, find_config_error

_PACKAGE_DIR = Path(__file__).resolve().parent
#: The folder holding ``pretrain.yaml`` and the config groups (``conf/`` at the repository root).
CONF_DIR = (_PACKAGE_DIR / "conf") if (_PACKAGE_DIR / "conf").is_dir() else (_PACKAGE_DIR.parent / "conf")

#: Config groups a user selects with ``group=option`` on the command line.
GROUPS = ("method", "backbone", "mask", "data", "trainer", "logger", "callbacks", "experiment")


def _auto_precision() -> str:
    """bf16 autocast where a CUDA device supports it, full fp32 otherwise (CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _auto_accelerator() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


OmegaConf.register_new_resolver("mim.auto_precision", _auto_precision, replace=True)
OmegaConf.register_new_resolver("mim.auto_accelerator", _auto_accelerator, replace=True)


def group_options(group: str) -> list[str]:
    """The option names of config group ``group`` (the yaml files in ``conf/<group>/``)."""
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _override_values(override: Any) -> list[Any]:
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_group_choices(overrides: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for ``group=option`` overrides that name no existing option.

    Hydra reports these as a multi-line message; this names the group, the bad option and the
    options that exist, in one line.
    """
    candidates = [o for o in overrides if "=" in o and not o.startswith("-")]
    if not candidates:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except HydraException as exc:
        raise ConfigError("overrides", " ".join(candidates), "key=value pairs", str(exc).splitlines()[0]) from None
    for override in parsed:
        group = override.key_or_group.lstrip("+~")
        if group not in GROUPS or override.is_delete():
            continue
        allowed = group_options(group)
        for value in _override_values(override):
            if value is None or str(value) == "null":
                continue
            if str(value) not in allowed:
                raise ConfigError(group, str(value), ", ".join(allowed), f"no option '{value}' in conf/{group}/")


def normalize_overrides(overrides: Iterable[str]) -> list[str]:
    """``group=null`` -> ``~group``: Hydra cannot set a group whose default is an option to null."""
    result = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in GROUPS and value.strip() in ("null", "None", "none"):
            result.append(f"~{key}")
        else:
            result.append(override)
    return result


def compose(config_name: str = "pretrain", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, as the command line would.

    Raises :class:`ConfigError` for an unknown group option.
    """
    overrides = normalize_overrides(overrides)
    check_group_choices(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except HydraException as exc:
        raise ConfigError("overrides", " ".join(overrides), "valid Hydra overrides", str(exc).splitlines()[0]) from None


def as_config_error(exc: BaseException) -> ConfigError | None:
    """Turn the errors that bad configs produce (ours, OmegaConf's, Hydra's) into one-line ConfigErrors."""
    found = find_config_error(exc)
    if found is not None:
        return found
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, MissingMandatoryValue):
            key = getattr(current, "full_key", None) or "?"
            return ConfigError(key, "???", "a value on the command line, e.g. " f"{key}=...", "missing mandatory value")
        if isinstance(current, OmegaConfBaseException):
            key = getattr(current, "full_key", None) or "config"
            return ConfigError(key, "?", "a valid value", str(current).splitlines()[0])
        current = current.__cause__ or current.__context__
    return None


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces our :class:`ConfigError` instead of Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised unchanged unless it is a config problem
        error = as_config_error(exc)
        if error is not None:
            raise error from None
        raise


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python, for checkpoints and run metadata."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
