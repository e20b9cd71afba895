"""The pretraining LightningModule shared by every method.

A method is a model (``model(images, mask) -> MIMOutput``) plus an optimizer recipe; this module
turns the recipe into AdamW parameter groups, the scaled learning rate and a per-step schedule,
and logs ``train/loss``, ``train/lr``, ``train/grad_norm`` and ``val/loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from mim_lightning.modules.recipe import LR_DEFAULTS, LearningRateRecipe, NonFinitePolicy, lr_recipe
from mim_lightning.optim import compile_in_place, make_optimizer, no_decay_names, param_groups

#: MAE's recipe values, where a method's yaml leaves a key out.
DEFAULT_LR = LR_DEFAULTS


class PretrainModule(LearningRateRecipe, NonFinitePolicy, pl.LightningModule):
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
        self.lr_config = lr_recipe(lr, DEFAULT_LR, "method.lr")
        self.batch_size = int(batch_size)
        self.init_nonfinite(on_nonfinite, nonfinite_check_every_n_steps)
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

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        output = self.model(batch["images"], mask=batch.get("mask"))
        loss = output.loss
        if not self.keep_step(loss):
            return None  # on_nonfinite=skip: Lightning skips backward and the optimizer step
        batch_size = batch["images"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        for name, value in output.losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        self.log_lr(batch_size, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        output = self.model(batch["images"], mask=batch.get("mask"))
        self.log("val/loss", output.loss, prog_bar=True, sync_dist=True, batch_size=batch["images"].shape[0])
        return output.loss

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # reads the non-finite flag
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "num_skipped"):
            self.log("data/skipped", float(datamodule.num_skipped()), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        self.check_nonfinite()  # never write weights that went through a non-finite step
        self.check_weights_finite()

        state: dict[str, Any] = {"skipped_steps": self.skipped_steps, **self.encoder_record()}
        for logger in self.trainer.loggers if self._trainer is not None else []:
            if isinstance(logger, WandbLogger) and logger.version:
                state["wandb_id"] = str(logger.version)  # a resumed run continues the same W&B run
        checkpoint["mim_lightning"] = state

    def encoder_record(self) -> dict[str, Any]:
        """``{"method": name, "encoder": {"backbone", "image_size", ...}}``: what finetuning and export read from a
        checkpoint to rebuild the encoder without ``method=``/``backbone=`` (the method's ``encoder_config`` adds
        its own values, e.g. window sizes). Empty for a model no method spec declares."""
        from mim_lightning.methods import spec_for_model

        spec = spec_for_model(self.model)
        if spec is None:
            return {}
        config = dict(self.hparams.get("config") or {})
        model_config = ((config.get("method") or {}).get("model") or {})
        encoder = {"backbone": config.get("backbone"), "image_size": (config.get("data") or {}).get("image_size"),
                   **spec.encoder_config(model_config)}
        return {"method": spec.name, "encoder": encoder}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("mim_lightning", {}).get("skipped_steps", 0))

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        lr = self.learning_rate()
        groups = param_groups(self.model, self.weight_decay, exempt=self._no_decay_names)
        from mim_lightning.parallel import optimizer_device

        optimizer = make_optimizer(self.optimizer_factory, groups, lr, optimizer_device(self))  # fused AdamW on CUDA
        scheduler = self.lr_scheduler(optimizer, lr)
        warmup, total = self.schedule_steps()
        rank_zero_info(
            f"[mim_lightning] effective batch {self.effective_batch_size()} = {self.batch_size} per device x "
            f"{self.trainer.world_size} devices x {self.trainer.accumulate_grad_batches} accumulation; lr {lr:.3g}; "
            f"warm-up {warmup} of {total} optimizer steps")
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
