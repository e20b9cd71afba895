"""Resuming cannot change a run: the stored config comes back, and overrides that would change what is
trained are refused.

``resume=auto run_dir=X`` (or ``ckpt_path=...``) continues the run stored in ``X``: its config is read
from the newest usable checkpoint (``hyper_parameters.config``), else from ``X/config.yaml``. Overrides
given with the resume are sorted into

- identity keys (:func:`is_identity_key`: the model, data, mask, optimisation, seed, batch and devices):
  refused in one line naming each differing key and its stored value, unless ``resume_force=true``;
- everything else (length: ``trainer.max_steps`` / ``max_epochs``; logging, workers, callbacks):
  accepted and printed; a length change re-plans the lr schedule and says so.

A resumed run writes ``config.resume-<N>.yaml`` beside the original ``config.yaml``, never over it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mim_lightning.errors import ConfigError

#: Top-level keys that hold the run's identity: what is trained, on what, how.
IDENTITY_ROOTS = ("method", "backbone", "mask", "data", "finetune", "seed", "mode", "num_classes")
#: Data keys that only say how the loader runs (accepted on resume).
LOADER_KEYS = ("data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor")
#: Trainer keys that change the optimisation or the effective batch.
TRAINER_IDENTITY_KEYS = ("trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes",
                         "trainer.strategy", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm")
#: Keys whose change re-plans the lr schedule (the schedule spans the planned optimizer steps).
LENGTH_KEYS = ("trainer.max_steps", "trainer.max_epochs")
#: Keys that steer the resume itself.
CONTROL_KEYS = ("resume", "run_dir", "ckpt_path", "resume_force")


def _under(key: str, roots: Iterable[str]) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def is_identity_key(key: str) -> bool:
    """Whether a change of ``key`` (dotted) would change what a run trains."""
    if _under(key, LOADER_KEYS) or key == "data.seed":
        return False
    if key.endswith("._target_") and key.startswith("data.source"):
        return True
    return _under(key, IDENTITY_ROOTS) or _under(key, TRAINER_IDENTITY_KEYS)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of a nested mapping (lists are leaves)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        if not node and prefix:
            out[prefix[:-1]] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = node
    return out


def differences(stored: Mapping[str, Any], current: Mapping[str, Any],
                keep: Callable[[str], bool] = lambda key: True) -> list[tuple[str, Any, Any]]:
    """``(key, stored, current)`` for every dotted key accepted by ``keep`` whose value differs between two
    resolved configs (``"<absent>"`` where one side lacks it)."""
    old, new = flatten(stored), flatten(current)
    keys = sorted(k for k in set(old) | set(new) if keep(k))
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in keys
            if _normal(old.get(k, "<absent>")) != _normal(new.get(k, "<absent>"))]


def identity_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The :func:`differences` of identity keys: what would change the run."""
    return differences(stored, current, is_identity_key)


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def refuse_changes(differences: Sequence[tuple[str, Any, Any]], where: str) -> None:
    """One line naming each differing key and its stored value (raises :class:`ConfigError`)."""
    if not differences:
        return
    first = ("name", "_target_", "family", "root", "image_size", "ratio", "base", "value", "batch_size")
    differences = sorted(differences, key=lambda d: (d[0].rpartition(".")[2] not in first, d[0]))
    shown = "; ".join(f"{k}: stored {old!r}, given {new!r}" for k, old, new in differences[:8])
    more = f" (+{len(differences) - 8} more)" if len(differences) > 8 else ""
    raise ConfigError("resume", where, "the run's own settings (or resume_force=true to continue with the new ones)",
                      f"would change the run: {shown}{more}")


def stored_config(run_dir: str | Path, checkpoint: str | Path | None = None) -> dict | None:
    """The resolved config of the run in ``run_dir``: from ``checkpoint`` (or the newest usable one), else
    ``config.yaml``; None when the folder holds neither."""
    from mim_lightning.callbacks.checkpoint import last_checkpoint

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint else last_checkpoint(run_dir / "checkpoints")
    if path is not None and Path(path).exists():
        config = checkpoint_config(path)
        if config:
            return upgrade_targets(config)
    file = run_dir / "config.yaml"
    if file.is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
        return upgrade_targets(loaded) if isinstance(loaded, dict) else None
    return None


#: Class paths of earlier versions that stored configs may name (the LightningModules moved to ``modules/``).
MOVED_TARGETS = {"mim_lightning.methods.PretrainModule": "mim_lightning.modules.PretrainModule"}


def upgrade_targets(config: dict) -> dict:
    """A stored config with the class paths of earlier versions replaced by today's: the pretraining module and
    the method's model (a method spec lists its model's old paths as ``aliases``)."""
    method = config.get("method")
    if not isinstance(method, dict):
        return config
    method["_target_"] = MOVED_TARGETS.get(method.get("_target_"), method.get("_target_"))
    model = method.get("model")
    if isinstance(model, dict) and model.get("_target_"):
        from mim_lightning.errors import ConfigError
        from mim_lightning.methods import spec_for_target

        try:
            model["_target_"] = spec_for_target(str(model["_target_"])).target
        except ConfigError:
            pass  # a model no method declares: instantiated as stored
    return config


def checkpoint_config(path: str | Path) -> dict | None:
    """``hyper_parameters.config`` of a Lightning checkpoint file or sharded folder (without ``run_info``), or None."""
    import torch

    path = Path(path) / "meta.pt" if Path(path).is_dir() else path  # a sharded checkpoint keeps its config there
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable file has no config; the caller falls back
        return None
    config = dict(((content.get("hyper_parameters") or {}).get("config")) or {})
    config.pop("run_info", None)
    return config or None


def move_paths(config: dict, old_root: str, new_root: str) -> dict:
    """Re-point every path under the stored run folder at the folder the run is resumed in (a copied or
    moved run folder keeps writing into itself)."""
    old_root, new_root = str(old_root).rstrip("/"), str(new_root).rstrip("/")
    if not old_root or old_root == new_root:
        return config

    def visit(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        if isinstance(node, list):
            return [visit(v) for v in node]
        if isinstance(node, str) and (node == old_root or node.startswith(old_root + "/")):
            return new_root + node[len(old_root):]
        return node

    return visit(config)


def next_resume_config_path(run_dir: str | Path) -> Path:
    """``<run_dir>/config.resume-<N>.yaml`` with the first unused N (1, 2, ...)."""
    run_dir = Path(run_dir)
    n = 1
    while (run_dir / f"config.resume-{n}.yaml").exists():
        n += 1
    return run_dir / f"config.resume-{n}.yaml"


def parse_key_values(overrides: Sequence[str]) -> list[tuple[str, str, Any]]:
    """``(kind, key, value)`` of Hydra overrides; kind is ``set``, ``add`` (``+key``) or ``delete`` (``~key``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    result = []
    for override in parsed:
        kind = "delete" if override.is_delete() else "add" if override.is_add() or override.is_force_add() else "set"
        value = None if kind == "delete" else override.value()
        result.append((kind, override.key_or_group, value))
    return result


def restore_run_config(app: str, overrides: Sequence[str], groups: Sequence[str]) -> tuple[DictConfig, list[str]] | None:
    """The config a command-line resume continues with, and lines describing what the overrides changed.

    None when the run folder has no stored config (a fresh start with the given overrides). Raises
    :class:`ConfigError` when an override would change the run and ``resume_force`` is not set.
    """
    from mim_lightning.config import compose

    settings = {key: value for kind, key, value in parse_key_values(overrides) if key in CONTROL_KEYS}
    run_dir = settings.get("run_dir")
    if run_dir is None:
        return None
    ckpt = settings.get("ckpt_path")
    ckpt = None if ckpt in (None, "", "last", "null") else str(ckpt)
    stored = stored_config(str(run_dir), ckpt)
    if stored is None:
        return None
    force = str(settings.get("resume_force", False)).lower() in ("true", "1", "yes")
    stored = move_paths(stored, str(stored.get("run_dir", "")), str(run_dir))
    rest = [o for o in overrides if o.partition("=")[0].lstrip("+~") not in CONTROL_KEYS]
    chooses_group = any(o.partition("=")[0].lstrip("+~") in groups for o in rest)
    notes: list[str] = []
    if chooses_group:
        # A repeated command line composes to the same run; anything else shows as a difference.
        fresh = OmegaConf.to_container(compose(app, [*rest, f"run_dir={run_dir}"]), resolve=True)
        refused = identity_differences(stored, fresh)
        if not force:
            refuse_changes(refused, str(run_dir))
        base = OmegaConf.create(fresh)
        changed = [(k, o, n) for k, o, n in differences(stored, fresh, lambda k: not _under(k, CONTROL_KEYS))
                   if not is_identity_key(k) or force]
    else:
        base = OmegaConf.create(stored)
        _check_keys_exist(base, parse_key_values(rest))
        refused = []
        for kind, key, value in parse_key_values(rest):
            old = OmegaConf.select(base, key, default="<absent>")
            new = "<absent>" if kind == "delete" else value
            if _normal(_plain(old)) != _normal(_plain(new)) and is_identity_key(key):
                refused.append((key, _plain(old), _plain(new)))
        if not force:
            refuse_changes(refused, str(run_dir))
        changed = []
        for kind, key, value in parse_key_values(rest):
            old = _plain(OmegaConf.select(base, key, default="<absent>"))
            if kind == "delete":
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(base, parent) if parent else base
                if isinstance(node, DictConfig) and leaf in node:
                    del node[leaf]
            else:
                OmegaConf.update(base, key, value, force_add=True, merge=False)
            new = _plain(OmegaConf.select(base, key, default="<absent>"))
            if _normal(old) != _normal(new):
                changed.append((key, old, new))
    with_run = OmegaConf.merge(base, {"run_dir": str(run_dir), "resume": settings.get("resume", "auto"),
                                      "ckpt_path": settings.get("ckpt_path"), "resume_force": force})
    for key, old, new in changed:
        note = f"resume: {key} changed from {old!r} to {new!r}"
        if key in LENGTH_KEYS:
            note += " (the lr schedule is re-planned over the new length)"
        notes.append(note)
    return with_run, notes


def _check_keys_exist(base: DictConfig, parsed: Sequence[tuple[str, str, Any]]) -> None:
    """A resume override of a key the stored run does not have is a typo: one line, with close keys."""
    import difflib

    missing = object()
    keys = list(flatten(base))
    for kind, key, _value in parsed:
        if kind == "set" and OmegaConf.select(base, key, default=missing) is missing:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
            hint = f"did you mean {' or '.join(close)}?" if close else "see config.yaml of the run"
            raise ConfigError(key, _value, f"a key of the stored run ({hint}); add a new key with +{key}=...",
                              "no such key")


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig,)) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_checkpoint_model(run: Mapping[str, Any], ckpt_path: str | Path) -> None:
    """The checkpoint a run continues holds the model this run builds: the same app (pretraining or finetuning),
    method and backbone (``checkpoint['mim_lightning']`` and ``hyper_parameters.config``); otherwise one line naming
    ``ckpt_path`` and the difference, even with ``resume_force`` (the weights would not load: dozens of
    ``size mismatch`` lines)."""
    import torch

    from mim_lightning.methods import spec_for_target

    path = Path(ckpt_path) / "meta.pt" if Path(ckpt_path).is_dir() else Path(ckpt_path)
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - checked as a file before; nothing more to compare
        return
    stored = dict((content.get("hyper_parameters") or {}).get("config") or {})
    record = content.get("mim_lightning") or {}
    kind = lambda config: "finetuning" if "finetune" in config else "pretraining"  # noqa: E731
    allowed = "a checkpoint of this run's model, or a command line naming the checkpoint's method= and backbone="
    if stored and kind(stored) != kind(run):
        raise ConfigError("ckpt_path", str(ckpt_path), allowed, f"a {kind(stored)} checkpoint, this is a {kind(run)} run")
    method = record.get("method")
    target = ((run.get("method") or {}).get("model") or {}).get("_target_") if isinstance(run.get("method"), Mapping) else None
    if method and target:
        try:
            mine = spec_for_target(str(target)).name
        except ConfigError:
            mine = None
        if mine is not None and mine != method:
            raise ConfigError("ckpt_path", str(ckpt_path), allowed, f"holds a method={method} model, this run is "
                              f"method={mine}")
    old = (record.get("encoder") or {}).get("backbone") or stored.get("backbone")
    new = run.get("backbone")
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        changed = [(k, o, n) for k, o, n in differences(old, new) if not k.startswith("decoder")]
        if changed or old.get("name") != new.get("name"):
            shown = ", ".join(f"{k} {o!r} vs {n!r}" for k, o, n in changed[:4])
            raise ConfigError("ckpt_path", str(ckpt_path), allowed, f"holds a backbone={old.get('name')} model, this "
                              f"run is backbone={new.get('name')}" + (f" ({shown})" if shown else ""))
