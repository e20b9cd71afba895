"""The method spec: everything about a method that pretraining, probes, finetuning, export and official weights
read, declared by the method itself (``methods/<name>/spec.py``) and found through one registry.

What a method provides (see docs/architecture.md, "Adding a method"):

- ``model``: the pretraining ``nn.Module`` class (``method.model._target_`` of ``conf/method/<name>.yaml``). It
  implements the encoder protocol: ``model.encoder`` (its weights are ``model.encoder.*`` in checkpoints) and
  ``model.pooled_features(images, pool) -> (B, D)`` (the online probes' features of unmasked images).
- ``encoder_config(model_config) -> dict``: the model-config values that rebuild the encoder (window sizes, layer
  scale...), stored in every pretraining checkpoint next to the backbone so that finetuning and export need no
  ``method=`` or ``backbone=``.
- ``convert_official(state) -> state``: an official pretraining checkpoint's tensors -> this project's model keys.
- ``export(encoder_state, config) -> (state, metadata)``: the safetensors content of ``mim_lightning.export``
  (timm keys and model name, or the project's own format with a builder).
- the finetuning recipe is the method's ``conf/finetune/<name>.yaml`` (a ``_target_`` classifier builder from
  :mod:`mim_lightning.models.classifiers`, layer decay, optimizer, probe recipe).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mim_lightning.errors import ConfigError

StateDict = dict[str, Any]


@dataclass(frozen=True)
class MethodSpec:
    """A method's declaration; see the module docstring. ``aliases``: other names of the method (``method=``
    values and model class paths of earlier versions that checkpoints may hold)."""

    name: str
    model: type
    convert_official: Callable[[Mapping[str, Any]], StateDict]
    export: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[StateDict, dict[str, str]]]
    encoder_config: Callable[[Mapping[str, Any]], dict[str, Any]] = field(default=lambda model_config: {})
    encoder_prefix: str = "model.encoder."
    aliases: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        """The import path of the pretraining model class."""
        return f"{self.model.__module__}.{self.model.__qualname__}"


def builder_export(builder: str, encoder_config: Callable[[Mapping[str, Any]], dict[str, Any]]
                   ) -> Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[StateDict, dict[str, str]]]:
    """A ``MethodSpec.export`` in the project's own format (encoders timm has no model for): the encoder's state
    dict, rebuilt by the function at import path ``builder`` from the backbone, the image size and the run's
    ``encoder_config`` (``mim_lightning.export.load_exported``)."""

    def export(encoder: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[StateDict, dict[str, str]]:
        from mim_lightning.checkpoints.timm_keys import own_export

        model = (config.get("method") or {}).get("model") or {}
        return own_export(encoder, builder, config["backbone"], config["data"]["image_size"], encoder_config(model),
                          str(model.get("_target_", "")))

    return export


_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` findable (called by each method package at import; re-registering replaces it)."""
    _SPECS[spec.name] = spec
    return spec


def _import_builtin() -> None:
    """Import every method package of ``mim_lightning.methods`` (each registers its spec)."""
    import mim_lightning.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            importlib.import_module(f"{package.__name__}.{info.name}")


def all_specs() -> list[MethodSpec]:
    """Every registered method (the built-in ones and any registered from elsewhere), by name."""
    _import_builtin()
    return [_SPECS[name] for name in sorted(_SPECS)]


def _lookup(name: str) -> MethodSpec | None:
    for spec in _SPECS.values():
        if name == spec.name or name in spec.aliases or name == spec.target:
            return spec
    return None


def spec_named(name: str, key: str = "method") -> MethodSpec:
    """The spec of method ``name`` (a ``method=`` value or an alias); a one-line :class:`ConfigError` otherwise."""
    found = _lookup(str(name))
    if found is None:
        _import_builtin()
        found = _lookup(str(name))
    if found is None:
        raise ConfigError(key, name, ", ".join(s.name for s in all_specs()), "no such method")
    return found


def spec_for_target(target: str, key: str = "method.model._target_") -> MethodSpec:
    """The spec whose model class is ``target`` (an import path; the module is imported so that it registers)."""
    found = _lookup(str(target))
    if found is None:
        try:
            importlib.import_module(str(target).rpartition(".")[0])
        except ImportError:
            pass  # an old class path: a built-in method's alias may name it
        _import_builtin()
        found = _lookup(str(target))
    if found is None:
        raise ConfigError(key, target, "the model class of a registered method (" +
                          ", ".join(s.name for s in all_specs()) + ")", "no method spec for this model")
    return found


def spec_for_model(model: Any) -> MethodSpec | None:
    """The spec of a pretraining model instance (nearest registered class in its MRO), None for other models."""
    for cls in type(model).__mro__:
        for spec in _SPECS.values():
            if spec.model is cls:
                return spec
    return None


def spec_for_checkpoint(checkpoint: Mapping[str, Any], key: str = "ckpt") -> MethodSpec:
    """The method of a pretraining checkpoint: the name it stores (``checkpoint['mim_lightning']['method']``),
    else its stored config's ``method.model._target_``."""
    stored = (checkpoint.get("mim_lightning") or {}).get("method")
    if stored:
        return spec_named(stored, key)
    config = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
    target = ((config.get("method") or {}).get("model") or {}).get("_target_")
    if not target:
        raise ConfigError(key, "a checkpoint without a method", "a pretraining checkpoint of mim_lightning")
    return spec_for_target(str(target), key)
