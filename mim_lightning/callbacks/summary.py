"""The start-of-run summary: one block on rank 0 (console and the run's log file) that says what the run does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from mim_lightning import runlog

#: Below this many held-out images, validation numbers are noise: the summary warns.
MIN_USEFUL_VAL_IMAGES = 8


def _count(module: Any) -> str:
    if module is None:
        return "?"
    total = sum(p.numel() for p in module.parameters())
    return f"{total / 1e6:.2f}M" if total >= 1e5 else f"{total:,}"


def _steps(trainer: pl.Trainer) -> int | None:
    try:
        return int(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - an iterable without a length (streams) has no estimate
        return None


def _describe_data(datamodule: Any) -> dict[str, Any]:
    describe = getattr(datamodule, "describe", None)
    if callable(describe):
        try:
            return dict(describe())
        except Exception:  # noqa: BLE001 - the summary must never stop a run
            pass
    info: dict[str, Any] = {"source": type(datamodule).__name__, "demo": False}
    train = getattr(datamodule, "train_dataset", None)
    val = getattr(datamodule, "val_dataset", None)
    for name, dataset in (("train", train), ("val", val)):
        try:
            info[name] = len(dataset) if dataset is not None else 0
        except TypeError:
            info[name] = None
    info["classes"] = len(getattr(datamodule, "classes", []) or [])
    skipped = getattr(datamodule, "num_skipped", None)
    info["skipped"] = skipped() if callable(skipped) else 0
    return info


def _mask_line(datamodule: Any, config: Mapping[str, Any]) -> str:
    generator = getattr(datamodule, "mask_generator", None)
    if generator is None:
        node = config.get("mask")
        return "drawn by the model (mask=null)" if node is None else str(node.get("_target_", "?"))
    from mim_lightning.mask_stats import mask_statistics

    rule = type(generator).__name__
    parts = [rule]
    ratio = getattr(generator, "ratio", None)
    if ratio is not None:
        parts.append(f"ratio {ratio:g}")
    try:
        stats = mask_statistics(generator, samples=16, seed=0)
        parts.append(f"applied {stats['mask/ratio']:.3f}")
        parts.append(f"AvgDist {stats['mask/avg_dist']:.1f} px")
    except Exception:  # noqa: BLE001
        pass
    unit = getattr(generator, "unit", None)
    if unit is not None:
        parts.append(f"unit {unit if not isinstance(unit, (tuple, list)) else 'x'.join(map(str, unit))} px")
    if getattr(generator, "per_batch", False):
        parts.append("one mask per batch")
    return ", ".join(parts)


def _checkpoint_line(trainer: pl.Trainer) -> str:
    callbacks = list(trainer.checkpoint_callbacks)
    if not callbacks:
        return "none (no checkpoint callback)"
    ckpt = callbacks[0]
    every = getattr(ckpt, "_every_n_train_steps", 0) or getattr(ckpt, "every_n_train_steps", 0)
    parts = [f"{ckpt.dirpath}"]
    if every:
        parts.append(f"a snapshot every {every} optimizer steps")
    keep = getattr(ckpt, "keep_last_k", None)
    if keep is None:
        keep = getattr(ckpt, "save_top_k", None)
    if keep is not None:
        parts.append("keeps all snapshots" if int(keep) < 0 else f"keeps the newest {int(keep)}")
    if getattr(ckpt, "save_last", False):
        parts.append("last.ckpt")
    return ", ".join(parts)


class RunSummary(Callback):
    """At the start of training, print (and keep in the run log) what the run does: method, backbone and
    parameter count, image size, mask, data, effective batch, lr and schedule, epochs, precision, devices
    and strategy, checkpoint policy and run folder; warn when it trains on the demo photos or holds out
    fewer than 8 images for validation."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = dict(config or {})
        self.lines: list[str] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        try:
            self.lines = self.summary(trainer, pl_module)
        except Exception as exc:  # noqa: BLE001 - the summary must never stop a run
            self.lines = [f"(run summary unavailable: {type(exc).__name__}: {exc})"]
        runlog.info("run summary\n  " + "\n  ".join(self.lines))
        for warning in self.warnings(trainer):
            runlog.warning(warning)

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        config = self.config
        data_cfg = config.get("data") or {}
        backbone = config.get("backbone") or {}
        model = getattr(pl_module, "model", pl_module)
        encoder = getattr(model, "encoder", None)
        method = ((config.get("method") or {}).get("model") or {}).get("_target_", type(model).__name__)
        lines = []
        if config.get("finetune") is not None:
            recipe = config.get("finetune") or {}
            method = recipe.get("method") or method
            head = (recipe.get("classifier") or {}).get("_target_", "?") if isinstance(recipe.get("classifier"), dict) \
                else recipe.get("classifier")
            lines.append(f"mode: {config.get('mode', 'finetune')} ({type(model).__name__} from {head}); "
                         f"pretrained: {config.get('pretrained')}")
        lines.append(f"method: {method}; model {_count(model)} parameters")
        enc = f", encoder {_count(encoder)} parameters" if encoder is not None else ""
        lines.append(f"backbone: {backbone.get('name', '?')} ({backbone.get('family', '?')}){enc}")
        lines.append(f"image size: {data_cfg.get('image_size', '?')} px")
        datamodule = trainer.datamodule
        if config.get("finetune") is None:
            lines.append(f"mask: {_mask_line(datamodule, config)}")
        info = _describe_data(datamodule)
        self._data = info
        found = info.get("images")
        data = [str(info.get("source", "?"))]
        if found is not None:
            data.append(f"{found} images found")
        data.append(f"{info.get('train', '?')} for training" + (f" (x{info['repeat']} per epoch)"
                                                              if info.get("repeat", 1) not in (None, 1) else ""))
        data.append(f"{info.get('val', '?')} held out")
        if info.get("classes"):
            data.append(f"{info['classes']} classes")
        data.append(f"{info.get('skipped', 0)} skipped so far")
        lines.append("data: " + ", ".join(data))
        effective = getattr(pl_module, "effective_batch_size", None)
        batch = effective() if callable(effective) else "?"
        per_device = data_cfg.get("batch_size", "?")
        lines.append(f"batch: {batch} effective = {per_device} per device x {trainer.world_size} devices x "
                     f"{trainer.accumulate_grad_batches} accumulation")
        lr = getattr(pl_module, "learning_rate", None)
        schedule = getattr(pl_module, "schedule_steps", None)
        lr_text = f"{lr():.4g}" if callable(lr) else "?"
        if callable(schedule):
            warmup, total = schedule()
            lines.append(f"lr: {lr_text}; warm-up {warmup} of {total} optimizer steps")
        else:
            lines.append(f"lr: {lr_text}; {_steps(trainer)} optimizer steps")
        lines.append(f"epochs: {trainer.max_epochs}" + (f", max_steps {trainer.max_steps}" if trainer.max_steps > 0 else ""))
        strategy = type(trainer.strategy).__name__
        lines.append(f"precision: {trainer.precision}; devices: {trainer.world_size} ({trainer.num_nodes} node(s), "
                     f"{type(trainer.accelerator).__name__.replace('Accelerator', '').lower()}); strategy: {strategy}")
        lines.append(f"checkpoints: {_checkpoint_line(trainer)}")
        lines.append(f"run folder: {config.get('run_dir', trainer.default_root_dir)}")
        return lines

    def warnings(self, trainer: pl.Trainer) -> list[str]:
        info = getattr(self, "_data", None) or _describe_data(trainer.datamodule)
        found = []
        if info.get("demo"):
            found.append("training on the demo photos (17 images shipped with scikit-image): for your own images pass "
                         "data=folder data.root=/path/to/images")
        val = info.get("val")
        if isinstance(val, int) and val < MIN_USEFUL_VAL_IMAGES:
            found.append(f"only {val} held-out images: validation numbers are noise (raise data.val_min_images or "
                         f"data.val_fraction, or give val_root=)")
        return found
