"""An exponential moving average of the weights that works unsharded (DDP, one device) and under FSDP2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from mim_lightning.errors import ConfigError

#: The checkpoint key of the averaged weights (a sharded checkpoint keeps it in its shards).
EMA_KEY = "ema_state_dict"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor.data


class EMA(Callback):
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step, over the trainable parameters.

    Validation runs with the averaged weights (swapped in and back), and at the end of training they are copied
    into the model, as Lightning's ``EMAWeightAveraging``. Where it differs from that callback and why: under
    ``trainer=fsdp`` the average is kept per shard (each rank averages only its own part: memory / world size,
    no communication), whereas ``EMAWeightAveraging`` deep-copies the whole unsharded model. Checkpoints keep the
    live weights in ``state_dict`` (so a resume continues exactly) and the average under ``ema_state_dict``,
    which a sharded checkpoint stores in its shards (:class:`mim_lightning.parallel.FSDP2Strategy`).
    """

    def __init__(self, decay: float = 0.9999) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ConfigError("callbacks.ema.decay", decay, "a number in [0, 1), e.g. 0.9999")
        self.decay = float(decay)
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._ema: list[torch.Tensor] = []
        self._updated_step = 0

    def _ensure(self, pl_module: pl.LightningModule) -> None:
        if self._ema:
            return
        from mim_lightning.optim import unwrapped_name

        named = [(unwrapped_name(n), p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._ema = [_local(p).detach().clone() for p in self._params]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step <= self._updated_step:
            return  # no optimizer step in this batch (accumulation, a skipped step)
        self._ensure(pl_module)
        with torch.no_grad():
            torch._foreach_lerp_(self._ema, [_local(p) for p in self._params], 1.0 - self.decay)
        self._updated_step = trainer.global_step

    def _swap(self) -> None:
        with torch.no_grad():
            for ema, param in zip(self._ema, self._params):
                live = _local(param)
                kept = live.clone()
                live.copy_(ema)
                ema.copy_(kept)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ema and not trainer.sanity_checking:
            self._swap()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ema and not trainer.sanity_checking:
            self._swap()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for ema, param in zip(self._ema, self._params):
                _local(param).copy_(ema)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updated_step": self._updated_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._updated_step = int(state_dict.get("updated_step", 0))

    def _as_saved(self) -> dict[str, torch.Tensor]:
        """The averages with the parameters' layout: DTensors of the same sharding for sharded parameters."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, ema, param in zip(self._names, self._ema, self._params):
            if isinstance(param, DTensor):
                ema = DTensor.from_local(ema, param.device_mesh, param.placements, run_check=False,
                                         shape=param.size(), stride=param.stride())
            out[name] = ema
        return out

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._ema:
            checkpoint[EMA_KEY] = self._as_saved()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._ensure(pl_module)
        path = trainer.ckpt_path
        if EMA_KEY in checkpoint:  # a single-file checkpoint
            saved = checkpoint[EMA_KEY]
        elif path is not None and Path(path).is_dir() and (Path(path) / ".metadata").is_file():
            import torch.distributed.checkpoint as dcp

            saved = self._as_saved()
            dcp.load({EMA_KEY: saved}, checkpoint_id=str(path))
        else:
            return  # a checkpoint of a run without EMA: the average starts from the loaded weights
        with torch.no_grad():
            for name, ema in zip(self._names, self._ema):
                if name in saved:
                    ema.copy_(_local(saved[name]).to(ema.device))
