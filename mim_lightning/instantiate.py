"""Hydra instantiation and config conversion that surface one-line :class:`ConfigError`\ s (used by every room
that builds objects from a config; the composition itself is :mod:`mim_lightning.config`)."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mim_lightning.errors import ConfigError, find_config_error


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
