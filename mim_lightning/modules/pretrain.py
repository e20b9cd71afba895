"""The pretraining LightningModule shared by every method.

A method is a model (``model(images, mask) -> MIMOutput``) plus an optimizer recipe; this module
turns the recipe into AdamW parameter groups, the scaled learning rate and a per-step schedule,
and logs ``train/loss``, ``train/lr``, ``train/grad_norm`` and ``val/loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from mim_lightning.errors import ConfigError, NonFiniteLossError
from mim_lightning.optim import (compile_in_place, make_optimizer, no_decay_names, param_groups, scaled_lr,
                                 warmup_cosine_factor, warmup_multistep_factor)

DEFAULT_LR = {
    "base": 1.5e-4,
    "base_batch_size": 256,
    "value": None,
    "min": 0.0,
    "warmup_epochs": 40.0,
    "warmup_steps": None,
    "warmup_start": 0.0,
    "scale_min_and_warmup": False,
    "schedule": "cosine",
    "milestones_epochs": (),
    "gamma": 0.1,
    "cosine_from": "warmup_end",
}

SCHEDULES = ("cosine", "multistep")
COSINE_ORIGINS = ("warmup_end", "start")
NONFINITE_POLICIES = ("stop", "skip")
#: What a recorded non-finite value was (index stored on the device).
NONFINITE_KINDS = ("training loss", "gradient norm")
_NO_STEP = torch.iinfo(torch.long).max


class PretrainModule(pl.LightningModule):
    """Self-supervised pretraining of ``model`` with its method's optimizer recipe.

    Args:
        model: the method's model; ``model(images, mask=None)`` returns a :class:`MIMOutput`.
        optimizer: a partial optimizer constructor (``torch.optim.AdamW`` with betas, eps) that takes
            parameter groups and ``lr``.
        weight_decay: decay of the decayed group.
        no_weight_decay: the rule that picks undecayed parameters (see ``optim.NO_DECAY_RULES``).
        no_weight_decay_keys: parameter-name substrings that are never decayed on top of the rule
            (e.g. SimMIM's ``mask_token``, ``absolute_pos_embed``, ``relative_position_bias_table``).
        lr: ``base`` lr per ``base_batch_size`` images (the effective batch counts devices, nodes and
            accumulation), or an absolute ``value``; ``min`` lr, warm-up in ``warmup_epochs`` (fractional)
            or ``warmup_steps``, from ``warmup_start`` lr (0 as MAE); ``scale_min_and_warmup`` scales
            ``min`` and ``warmup_start`` by the same batch factor as the lr (SimMIM). ``schedule`` is
            ``cosine`` (half-cycle to ``min``) or ``multistep`` (x ``gamma`` at each of ``milestones_epochs``);
            ``cosine_from``: ``warmup_end`` (MAE: the cosine starts after warm-up) or ``start`` (SimMIM/timm:
            the cosine runs over the absolute step).
        batch_size: the per-device batch size (``data.batch_size``), for the lr rule.
        config: the resolved run config, stored in checkpoints so that finetuning and export can
            rebuild the model.
        on_nonfinite: ``stop`` (default) raises :class:`NonFiniteLossError` naming the first step whose loss
            or gradient norm was NaN/inf, and no checkpoint with broken weights is ever written; ``skip`` drops
            such a step (no update) and counts it in ``train/skipped_steps``.
        nonfinite_check_every_n_steps: how ``stop`` finds them without a host-device sync per step: the loss
            and gradient norm are tested on the device every step, and the flag is read (one sync) every
            N optimizer steps before that step's update, before every checkpoint is written, and at the end
            of each epoch and of training. With 1 every step is read before its update (the run stops before
            applying a bad step); with N > 1 up to N - 1 bad steps may be applied in memory, but they never
            reach a checkpoint and the error names the first one. ``skip`` must decide before each optimizer
            step, so it reads the flag every step (two syncs per step).
        compile: compile the model in place with ``torch.compile`` (``nn.Module.compile``; checkpoint keys
            stay those of the plain model); ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``...).

    The batch's ``mask`` stays on the host (:meth:`transfer_batch_to_device`); models copy it to the device
    without blocking, after reading on the host what must become a Python number (MAE/iTPN: the number of
    visible patches), so the training step has no host-device sync.
    """

    def __init__(self, model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 weight_decay: float = 0.05, no_weight_decay: str = "ndim_or_bias",
                 no_weight_decay_keys: list[str] | tuple[str, ...] = (), lr: Mapping[str, Any] | None = None,
                 batch_size: int = 64, config: Mapping[str, Any] | None = None, on_nonfinite: str = "stop",
                 nonfinite_check_every_n_steps: int = 50, compile: bool = False,
                 compile_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, betas=(0.9, 0.95))
        self.weight_decay = float(weight_decay)
        self.no_weight_decay = no_weight_decay
        self.no_weight_decay_keys = tuple(no_weight_decay_keys)
        # decided now, before a strategy (FSDP) wraps and flattens the parameters
        self._no_decay_names = no_decay_names(model, no_weight_decay, self.no_weight_decay_keys)
        self.lr_config = {**DEFAULT_LR, **dict(lr or {})}
        if self.lr_config["schedule"] not in SCHEDULES:
            raise ConfigError("method.lr.schedule", self.lr_config["schedule"], ", ".join(SCHEDULES))
        if self.lr_config["cosine_from"] not in COSINE_ORIGINS:
            raise ConfigError("method.lr.cosine_from", self.lr_config["cosine_from"], ", ".join(COSINE_ORIGINS))
        self.batch_size = int(batch_size)
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError("on_nonfinite", on_nonfinite, ", ".join(NONFINITE_POLICIES))
        self.on_nonfinite = on_nonfinite
        every = nonfinite_check_every_n_steps
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError("nonfinite_check_every_n_steps", every,
                              "a positive integer (1 reads the flag before every optimizer step)")
        self.nonfinite_check_every_n_steps = every
        # (step, kind, value) of the first non-finite loss / gradient norm, on the device; step -1 = none yet
        self._first_nonfinite: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.skipped_steps = 0
        self.save_hyperparameters(ignore=["model", "optimizer"])
        compile_in_place(self.model, bool(compile), dict(compile_kwargs or {}))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        return self.model(images, mask=mask)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` shard the model with FSDP2 (one unit per block; :mod:`mim_lightning.parallel`);
        nothing under other strategies."""
        from mim_lightning.parallel import shard_module

        shard_module(self)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move the batch to ``device`` except its ``mask``, which the model copies itself without blocking
        (see the class docstring); a pinned host mask makes that copy asynchronous."""
        if isinstance(batch, Mapping) and isinstance(batch.get("mask"), torch.Tensor):
            moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k != "mask"}, device,
                                                     dataloader_idx)
            moved["mask"] = batch["mask"]
            return moved
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ non-finite losses and gradients
    def _all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (one host sync; ranks must agree to skip together)."""
        finite = torch.isfinite(value.detach()).all().float()
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return bool(finite.item())

    def _skip(self) -> None:
        self.skipped_steps += 1
        self.log("train/skipped_steps", torch.tensor(float(self.skipped_steps)))

    def record_nonfinite(self, kind: int, value: torch.Tensor) -> None:
        """Remember, on the device and without a sync, the first step at which ``value`` (a scalar; ``kind``
        indexes :data:`NONFINITE_KINDS`) is NaN/inf. :meth:`check_nonfinite` reads it."""
        value = value.detach().float().reshape(())
        if self._first_nonfinite is None or self._first_nonfinite[0].device != value.device:
            self._first_nonfinite = (torch.full((), -1, dtype=torch.long, device=value.device),
                                     torch.zeros((), dtype=torch.long, device=value.device),
                                     torch.zeros((), device=value.device))
        step, which, seen = self._first_nonfinite
        new = ~torch.isfinite(value) & (step < 0)
        self._first_nonfinite = (torch.where(new, self.global_step, step), torch.where(new, kind, which),
                                 torch.where(new, value, seen))

    def check_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a recorded step had a non-finite loss or gradient norm on any
        rank (one host sync; every rank calls this at the same points)."""
        if self._first_nonfinite is None:
            return
        step, which, seen = self._first_nonfinite
        first = torch.where(step >= 0, step, torch.full_like(step, _NO_STEP))
        if self._trainer is not None and self.trainer.world_size > 1:
            first = self.trainer.strategy.reduce(first, reduce_op="min")
        first_step = int(first.item())
        if first_step == _NO_STEP:
            return
        mine = int(step.item()) == first_step
        what = NONFINITE_KINDS[int(which.item())] if mine else "loss or gradient norm (on another rank)"
        shown = seen.item() if mine else "nan/inf"
        if first_step == self.global_step:
            where = f"at step {first_step}, epoch {self.current_epoch}; stopping before the optimizer step"
        else:
            where = (f"at step {first_step}; found at step {self.global_step} (on_nonfinite=stop reads the flag "
                     f"every {self.nonfinite_check_every_n_steps} steps and before every checkpoint)")
        raise NonFiniteLossError(
            f"non-finite {what} ({shown}) {where}; no checkpoint holds weights from that step on. Lower "
            "method.lr.base, set trainer.gradient_clip_val, use bf16 instead of fp16, or on_nonfinite=skip.")

    def gradient_norm(self) -> torch.Tensor | None:
        """The total 2-norm of the model's gradients (``train/grad_norm``), None before any backward."""
        from mim_lightning.parallel import full_tensor

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # FSDP2: the norm of the sharded gradients is a DTensor; its full value is the same on every rank
        return full_tensor(torch.nn.utils.get_total_norm(grads)) if grads else None

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        output = self.model(batch["images"], mask=batch.get("mask"))
        loss = output.loss
        if self.on_nonfinite == "skip":
            if not self._all_finite(loss):
                self._skip()
                return None  # Lightning skips backward and the optimizer step
        else:
            self.record_nonfinite(0, loss)  # read in on_before_optimizer_step, every N steps
        batch_size = batch["images"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        for name, value in output.losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        # a host tensor: Lightning would copy a Python float to the device with a blocking copy
        lr = torch.tensor(float(self.optimizers().param_groups[0]["lr"]))
        self.log("train/lr", lr, prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        output = self.model(batch["images"], mask=batch.get("mask"))
        self.log("val/loss", output.loss, prog_bar=True, sync_dist=True, batch_size=batch["images"].shape[0])
        return output.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm = self.gradient_norm()
        # fp16 loss scaling produces inf gradients by design; its scaler skips those steps itself.
        checked = norm is not None and not str(self.trainer.precision).startswith("16")
        if self.on_nonfinite == "skip":
            if checked and not self._all_finite(norm):
                self._skip()
                optimizer.zero_grad(set_to_none=True)  # params without grads are not updated
                return
        else:
            if checked:
                self.record_nonfinite(1, norm)
            if (self.global_step + 1) % self.nonfinite_check_every_n_steps == 0:
                self.check_nonfinite()
        if norm is not None:
            self.log("train/grad_norm", norm)

    def on_train_epoch_end(self) -> None:
        self.check_nonfinite()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "num_skipped"):
            self.log("data/skipped", float(datamodule.num_skipped()), sync_dist=True)

    def on_train_end(self) -> None:
        self.check_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        self.check_nonfinite()  # never write weights that went through a non-finite step

        state: dict[str, Any] = {"skipped_steps": self.skipped_steps}
        for logger in self.trainer.loggers if self._trainer is not None else []:
            if isinstance(logger, WandbLogger) and logger.version:
                state["wandb_id"] = str(logger.version)  # a resumed run continues the same W&B run
        checkpoint["mim_lightning"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("mim_lightning", {}).get("skipped_steps", 0))

    # ------------------------------------------------------------------ optimizer
    def effective_batch_size(self) -> int:
        from mim_lightning.parallel import data_parallel_size

        trainer = self.trainer
        return self.batch_size * data_parallel_size(trainer) * int(trainer.accumulate_grad_batches)

    def batch_factor(self) -> float:
        """``effective_batch / base_batch_size``: the factor of the linear scaling rule."""
        return self.effective_batch_size() / int(self.lr_config["base_batch_size"])

    def learning_rate(self) -> float:
        if self.lr_config["value"] is not None:
            return float(self.lr_config["value"])
        return scaled_lr(float(self.lr_config["base"]), self.effective_batch_size(), int(self.lr_config["base_batch_size"]))

    def min_and_warmup_start_lr(self) -> tuple[float, float]:
        scale = self.batch_factor() if self.lr_config["scale_min_and_warmup"] and self.lr_config["value"] is None else 1.0
        return float(self.lr_config["min"]) * scale, float(self.lr_config["warmup_start"]) * scale

    def schedule_steps(self) -> tuple[int, int]:
        """(warm-up steps, total optimizer steps) for the per-step schedule."""
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)
        if self.lr_config["warmup_steps"] is not None:
            warmup = int(self.lr_config["warmup_steps"])
        else:
            warmup = int(round(float(self.lr_config["warmup_epochs"]) * self.steps_per_epoch()))
        return min(warmup, total), total

    def steps_per_epoch(self) -> int:
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            raise ConfigError("method.lr.warmup_epochs", self.lr_config["warmup_epochs"],
                              "method.lr.warmup_steps for data without a known epoch length")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def configure_optimizers(self):
        lr = self.learning_rate()
        groups = param_groups(self.model, self.weight_decay, exempt=self._no_decay_names)
        from mim_lightning.parallel import optimizer_device

        optimizer = make_optimizer(self.optimizer_factory, groups, lr, optimizer_device(self))  # fused AdamW on CUDA
        warmup, total = self.schedule_steps()
        min_lr, start_lr = self.min_and_warmup_start_lr()
        start_factor = start_lr / lr if lr > 0 else 0.0
        if self.lr_config["schedule"] == "multistep":
            milestones = [int(round(float(e) * self.steps_per_epoch())) for e in self.lr_config["milestones_epochs"]]
            schedule = partial(warmup_multistep_factor, warmup_steps=warmup, milestones=milestones,
                               gamma=float(self.lr_config["gamma"]), warmup_start_factor=start_factor)
        else:
            schedule = partial(warmup_cosine_factor, warmup_steps=warmup, total_steps=total,
                               min_factor=min_lr / lr if lr > 0 else 0.0, warmup_start_factor=start_factor,
                               cosine_from_start=self.lr_config["cosine_from"] == "start")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        rank_zero_info(
            f"[mim_lightning] effective batch {self.effective_batch_size()} = {self.batch_size} per device x "
            f"{self.trainer.world_size} devices x {self.trainer.accumulate_grad_batches} accumulation; lr {lr:.3g}; "
            f"warm-up {warmup} of {total} optimizer steps")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
