"""Hydra composition for notebooks, tests and the entry points.

``compose("pretrain", ["method=mae", "backbone=vit_b"])`` returns the same config that
``python -m mim_lightning.train method=mae backbone=vit_b`` runs with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from mim_lightning.errors import ConfigError
from mim_lightning.instantiate import as_config_error, instantiate_checked, to_container  # noqa: F401 (re-exported)

_PACKAGE_DIR = Path(__file__).resolve().parent
#: The folder holding ``pretrain.yaml`` and the config groups (``conf/`` at the repository root).
CONF_DIR = (_PACKAGE_DIR / "conf") if (_PACKAGE_DIR / "conf").is_dir() else (_PACKAGE_DIR.parent / "conf")

#: Environment variable with more config folders (``os.pathsep``-separated), searched after ``conf/``: a folder with
#: ``method/<name>.yaml``, ``recipe/<name>.yaml``, ``finetune/<name>.yaml``, ``backbone/...`` adds options to
#: those groups without editing the package (a method of your own; docs/architecture.md).
CONF_PATH_ENV = "MIM_LIGHTNING_CONF"


def extra_conf_dirs() -> list[Path]:
    """The folders of :data:`CONF_PATH_ENV` that exist, absolute."""
    raw = os.environ.get(CONF_PATH_ENV, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p and Path(p).expanduser().is_dir()]


def searchpath_override() -> list[str]:
    """``hydra.searchpath=[file://...]`` for :func:`extra_conf_dirs` (nothing when there are none)."""
    dirs = extra_conf_dirs()
    return [f"hydra.searchpath=[{','.join('file://' + str(d) for d in dirs)}]"] if dirs else []


#: Config groups a user selects with ``group=option`` on the command line.
GROUPS = ("method", "backbone", "mask", "data", "trainer", "logger", "callbacks", "experiment", "finetune")
#: Groups an app calls by another name on its command line: finetuning's ``method=`` picks ``conf/finetune/<m>.yaml``.
GROUP_ALIASES = {"finetune": {"method": "finetune"}}


def _auto_precision() -> str:
    """bf16 autocast where a CUDA device supports it, full fp32 otherwise (CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _auto_accelerator() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def _pick(key: Any, table: Any, *default: Any) -> Any:
    """``${mim.pick:${backbone.family},{swin:192,vit:224}}``: the value of ``table`` for ``key``."""
    if key in table:
        return table[key]
    if default:
        return default[0]
    raise ConfigError("backbone.family", key, ", ".join(str(k) for k in table), "no value for this family")


def _total_stride(patch_size: Any, depths: Any) -> int:
    """``${mim.total_stride:${.patch_size},${.depths}}``: a Swin's output stride, the patch halved per stage
    after the first (4 x 2^3 = 32 for four stages)."""
    return int(patch_size) * 2 ** (len(depths) - 1)


OmegaConf.register_new_resolver("mim.auto_precision", _auto_precision, replace=True)
OmegaConf.register_new_resolver("mim.auto_accelerator", _auto_accelerator, replace=True)
OmegaConf.register_new_resolver("mim.pick", _pick, replace=True)
OmegaConf.register_new_resolver("mim.total_stride", _total_stride, replace=True)

#: The experiment a pretraining run gets when it chooses none of :data:`RUN_DEFINING_GROUPS`.
DEMO_EXPERIMENT = "demo"
#: Choosing any of these groups (or setting ``data.root``) makes a run a real run: no demo values.
RUN_DEFINING_GROUPS = ("method", "backbone", "data", "experiment")


def group_options(group: str) -> list[str]:
    """The option names of config group ``group`` (the yaml files in ``conf/<group>/``)."""
    return sorted({p.stem for root in (CONF_DIR, *extra_conf_dirs()) for p in (root / group).glob("*.yaml")})


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


def normalize_overrides(overrides: Iterable[str], app: str = "pretrain") -> list[str]:
    """``group=null`` -> ``~group``: Hydra cannot set a group whose default is an option to null; an app's group
    alias (finetuning's ``method=``) -> the group's own name."""
    result = []
    aliases = GROUP_ALIASES.get(app, {})
    for override in overrides:
        key, sep, value = override.partition("=")
        bare = key.lstrip("+~")
        if bare in aliases and "." not in key:
            key = key[: len(key) - len(bare)] + aliases[bare]
            override = f"{key}{sep}{value}"
        if sep and key in GROUPS and value.strip() in ("null", "None", "none"):
            result.append(f"~{key}")
        else:
            result.append(override)
    return result


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~").strip()


def is_demo_run(overrides: Iterable[str]) -> bool:
    """Whether a pretraining command line is the demo: it chooses none of method, backbone, data or
    experiment (group choices, ``group.key=...`` values of those groups other than loader settings do not
    count; ``data.root`` does)."""
    for override in overrides:
        key = _override_key(override)
        if key in RUN_DEFINING_GROUPS or key == "data.root":
            return False
    return True


def with_default_experiment(config_name: str, overrides: Sequence[str]) -> list[str]:
    """The overrides with ``experiment=demo`` prepended when a pretraining run is the demo (see
    :func:`is_demo_run`); every other run keeps the method's own defaults."""
    overrides = list(overrides)
    if config_name == "pretrain" and is_demo_run(overrides):
        return [f"experiment={DEMO_EXPERIMENT}", *overrides]
    return overrides


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}{key}"
            keys.append(full)
            try:
                child = node._get_node(key)
            except Exception:  # noqa: BLE001
                continue
            if isinstance(child, DictConfig):
                keys.extend(_flat_keys(child, f"{full}."))
    return keys


def _key_error(message: str, config_name: str, overrides: Sequence[str]) -> ConfigError | None:
    """A one-line error (with "did you mean") for Hydra's "Could not override 'x'" / "Key 'y' is not in struct"."""
    import difflib
    import re

    found = re.search(r"Could not (?:override|append to config\.) ?'([^']+)'", message) or \
        re.search(r"Could not override '([^']+)'", message)
    if found is None:
        return None
    key = found.group(1)
    value = next((o.partition("=")[2] for o in overrides if _override_key(o) == key), "?")
    try:
        keep = [o for o in overrides if _override_key(o) != key]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            base = hydra_compose(config_name=config_name, overrides=[*keep, *searchpath_override()])
        candidates = _flat_keys(base)
    except Exception:  # noqa: BLE001 - the hint is best effort
        candidates = []
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.75)
    hint = f"did you mean {' or '.join(close)}?" if close else "see --help or --cfg job for the keys"
    problem = "no such key"
    return ConfigError(key, value, f"an existing key ({hint}); add a new key with +{key}=...", problem)


def with_pretrained_encoder(config_name: str, overrides: Sequence[str]) -> list[str]:
    """Finetuning from a pretraining checkpoint of this project: the method (``finetune=``) and the backbone it
    stores are added unless given; a given ``method=`` of another method is a one-line :class:`ConfigError`.
    Other apps, other files (official ``.pth``, ``.safetensors``) and sweeps are unchanged."""
    overrides = list(overrides)
    if config_name != "finetune":
        return overrides
    values = {_override_key(o): o.partition("=")[2] for o in overrides if "=" in o}
    path = values.get("pretrained")
    if not path or "," in path:
        return overrides
    from mim_lightning.checkpoints.pretrained import stored_encoder
    from mim_lightning.resume import flatten

    stored = stored_encoder(path)
    if stored is None:
        return overrides
    given = values.get("finetune")
    if given is not None and given != stored["method"]:
        raise ConfigError("method", given, f"{stored['method']} (the method of pretrained={path}), or leave it out",
                          "the checkpoint was pretrained with another method")
    added = [] if given is not None else [f"finetune={stored['method']}"]
    backbone = stored.get("backbone")
    if "backbone" not in values and backbone and backbone.get("name") in group_options("backbone"):
        added.append(f"backbone={backbone['name']}")
        declared = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backbone" / f"{backbone['name']}.yaml"))
        known = flatten(declared, "backbone.")
        for key, value in flatten(backbone, "backbone.").items():
            if key not in values and known.get(key, object()) != value:
                added.append(f"++{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return [*added, *overrides]


def compose(config_name: str = "pretrain", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, as the command line would.

    A pretraining compose that chooses none of method, backbone, data or experiment is the demo
    (:func:`with_default_experiment`), exactly as ``python -m mim_lightning.train`` with the same overrides.
    Raises :class:`ConfigError` for an unknown group option or key (one line, with a close key when one exists).
    """
    overrides = with_default_experiment(config_name, normalize_overrides(overrides, config_name))
    overrides = with_pretrained_encoder(config_name, overrides)
    check_group_choices(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=[*overrides, *searchpath_override()])
    except HydraException as exc:
        message = " ".join(str(exc).split())
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        error = _key_error(message, config_name, overrides)
        if error is not None:
            raise error from None
        raise ConfigError("overrides", " ".join(overrides), "valid Hydra overrides", str(exc).splitlines()[0]) from None
