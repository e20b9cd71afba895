"""Online monitors of representation quality during pretraining, for any labelled data source.

The data come from the DataModule's explicit probe interface: ``datamodule.labelled``, ``datamodule.classes``
and ``datamodule.probe_datasets(max_train, max_held_out) -> (train, held_out)`` (labelled datasets through the
deterministic view, read by the run's own source: class folders, Fashion-MNIST, labelled shards, Hugging Face
rows with a label column), or None with the reason in ``datamodule.probe_unavailable``.

- :class:`KNNProbe` (``probe/knn_top1``): every ``every_n_steps`` optimizer steps and when training
  ends, pooled encoder features of training images (the bank) and of the held-out split (the queries),
  both with the validation view (resize + centre crop, no mask), classify each query by a weighted
  vote of its ``k`` nearest bank features (cosine similarity, weights ``exp(sim / temperature)``, as
  DINO's kNN evaluation).
- :class:`OnlineLinearProbe` (``probe/linear_top1``, ``probe/linear_train_top1``, ``probe/linear_loss``):
  after every training step, a linear classifier (MAE's linear-probe head: ``BatchNorm1d(affine=False,
  eps=1e-6)`` + ``Linear``) takes one step of its own AdamW on the pooled features of the training
  batch. The features come from a separate ``torch.no_grad()`` forward of the encoder on the unmasked
  batch (eval mode), so neither the probe's loss nor its optimizer can reach the encoder: the
  encoder's gradients, the model's weights and the training random streams are exactly those of a run
  without the probe. ``probe/linear_top1`` is its accuracy on the held-out split, measured during
  validation.

Both read features with :func:`mim_lightning.models.features.pooled_features` and switch themselves
off (with one warning) when the data has no labels or, for kNN, no held-out split. Accuracies are
fractions in [0, 1]. Under DDP the kNN features and the linear probe's training features are gathered
from every rank, so every rank computes the same kNN result and trains an identical probe; the held-out
accuracy sums every rank's counts.

Cost: the kNN pass runs the encoder on ``max_bank_images + max_query_images`` images each time; the
linear probe adds one no-grad encoder forward of the unmasked training batch per step (for MAE and
iTPN about 1/(1 - mask ratio) times the masked encoder pass, no backward).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from mim_lightning.errors import ConfigError
from mim_lightning.models.features import POOLS, pooled_features


def _check_pool(pool: str, key: str) -> str:
    if pool not in POOLS:
        raise ConfigError(key, pool, ", ".join(POOLS))
    return pool


def _labelled(datamodule: Any) -> bool:
    return bool(getattr(datamodule, "labelled", False)) and bool(getattr(datamodule, "classes", None))


@contextmanager
def _encoder_eval(pl_module: pl.LightningModule):
    """Model in eval mode, no autograd, random states untouched (restored on exit)."""
    model = pl_module.model
    was_training = model.training
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


def _features(trainer: pl.Trainer, model: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    with trainer.precision_plugin.forward_context():
        return pooled_features(model, images, pool).float()


def _gather(pl_module: pl.LightningModule, tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, rank-major: (world * n, ...); the tensor itself on one process."""
    if pl_module.trainer.world_size == 1:
        return tensor
    return pl_module.all_gather(tensor).flatten(0, 1)


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> float:
    """Weighted kNN accuracy: bank (N, D), queries (Q, D) features, labels (N,), (Q,) -> top-1 in [0, 1].

    Features are L2-normalized; each query's ``k`` most similar bank rows vote for their label with
    weight ``exp(cosine / temperature)``.
    """
    num_classes = int(num_classes if num_classes is not None else int(bank_labels.max()) + 1)
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(int(k), bank.shape[0])
    correct = 0
    for start in range(0, queries.shape[0], 256):
        sim, idx = (queries[start: start + 256] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == query_labels[start: start + 256]).sum())
    return correct / max(1, queries.shape[0])


class KNNProbe(Callback):
    """``probe/knn_top1`` every ``every_n_steps`` optimizer steps and at the end of training.

    Args:
        every_n_steps: how often (0 = only at the end).
        k, temperature: neighbours and vote temperature (DINO: 20, 0.07).
        max_bank_images: training images in the bank (the first ones of the training list; all if fewer).
        max_query_images: held-out images classified (all of the held-out split if fewer).
        batch_size: images per feature forward (default: ``data.batch_size``).
        pool: ``mean`` (mean of the patch tokens, every model) or ``cls`` (ViT models with a cls token).
    """

    def __init__(self, every_n_steps: int = 1000, k: int = 20, temperature: float = 0.07, max_bank_images: int = 10000,
                 max_query_images: int = 1000, batch_size: int | None = None, pool: str = "mean") -> None:
        if int(k) < 1:
            raise ConfigError("callbacks.knn.k", k, "a positive integer, e.g. 20")
        if float(temperature) <= 0:
            raise ConfigError("callbacks.knn.temperature", temperature, "a positive number, e.g. 0.07")
        self.every_n_steps = int(every_n_steps)
        self.k = int(k)
        self.temperature = float(temperature)
        self.max_bank_images = int(max_bank_images)
        self.max_query_images = int(max_query_images)
        self.batch_size = batch_size
        self.pool = _check_pool(pool, "callbacks.knn.pool")
        self.enabled = False
        self.last_top1: float | None = None
        self._done_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        self.enabled = False
        probe_datasets = getattr(datamodule, "probe_datasets", None)
        found = probe_datasets(self.max_bank_images, self.max_query_images) if callable(probe_datasets) else None
        if found is None:
            reason = getattr(datamodule, "probe_unavailable", None) or "the DataModule has no probe_datasets()"
            warnings.warn(f"KNNProbe: {reason}; probe/knn_top1 is off", stacklevel=2)
            return
        self.bank_dataset, self.query_dataset = found
        self.num_classes = len(datamodule.classes)
        self.num_workers = int(getattr(datamodule, "num_workers", 0))
        self.loader_batch_size = int(self.batch_size or getattr(datamodule, "batch_size", 64))
        self.enabled = True

    def _dataset_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module,
                          dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of ``dataset`` in order; each rank computes a strided share, then all gather."""
        rank, world = trainer.global_rank, trainer.world_size
        count = len(dataset)
        per_rank = math.ceil(count / world)
        indices = [min(rank + j * world, count - 1) for j in range(per_rank)]  # padded to equal shares
        subset = torch.utils.data.Subset(dataset, indices)
        loader = DataLoader(subset, batch_size=self.loader_batch_size, shuffle=False, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(0))
        features, labels = [], []
        for batch in loader:
            features.append(_features(trainer, model, batch["images"].to(pl_module.device), self.pool))
            labels.append(torch.as_tensor(batch["label"], device=pl_module.device))
        features_t, labels_t = torch.cat(features), torch.cat(labels)
        if world > 1:  # (world, per_rank, ...) -> original order: position j * world + r is index r + j * world
            features_t = pl_module.all_gather(features_t).transpose(0, 1).flatten(0, 1)
            labels_t = pl_module.all_gather(labels_t).transpose(0, 1).flatten(0, 1)
        return features_t[:count], labels_t[:count]

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """Run the kNN evaluation now, log ``probe/knn_top1`` and return it (None when off)."""
        if not self.enabled:
            return None
        with _encoder_eval(pl_module) as model:
            bank, bank_labels = self._dataset_features(trainer, pl_module, model, self.bank_dataset)
            queries, query_labels = self._dataset_features(trainer, pl_module, model, self.query_dataset)
            top1 = knn_top1(bank, bank_labels, queries, query_labels, self.k, self.temperature, self.num_classes)
        self.last_top1 = top1
        self._done_step = trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"probe/knn_top1": top1}, step=trainer.global_step)
        return top1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._done_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and trainer.global_step != self._done_step:
            self.evaluate(trainer, pl_module)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.save()


class OnlineLinearProbe(Callback):
    """A linear classifier trained online on detached pooled features (see the module docstring).

    Args:
        lr, weight_decay, betas: its AdamW (separate from the model's optimizer; no schedule).
        pool: ``mean`` or ``cls`` (see :class:`KNNProbe`).
        seed: initialization of the head, drawn from its own generator (the run's random streams are untouched).

    The head and its optimizer state are saved in checkpoints (the callback's state), so a resumed run
    continues the same probe.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 pool: str = "mean", seed: int = 0) -> None:
        if float(lr) <= 0:
            raise ConfigError("callbacks.linear_probe.lr", lr, "a positive learning rate, e.g. 1e-3")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.betas = tuple(float(b) for b in betas)
        self.pool = _check_pool(pool, "callbacks.linear_probe.pool")
        self.seed = int(seed)
        self.enabled = False
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None
        self._val_correct = 0
        self._val_count = 0
        self.last_top1: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.head is not None:
            return
        datamodule = trainer.datamodule
        if not _labelled(datamodule):
            warnings.warn("OnlineLinearProbe: the data has no labels (e.g. data=imagefolder, labelled shards, data=hf "
                          "with data.source.label_column); probe/linear_* is off", stacklevel=2)
            return
        size = getattr(datamodule, "image_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        with _encoder_eval(pl_module) as model:
            parameter = next(model.parameters())
            dim = pooled_features(model, torch.zeros(2, 3, *size, dtype=parameter.dtype, device=parameter.device),
                                  self.pool).shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6),
                                      nn.Linear(dim, len(datamodule.classes)))
            nn.init.trunc_normal_(self.head[1].weight, std=0.01)  # MAE's linear-probe head init
            nn.init.zeros_(self.head[1].bias)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, betas=self.betas,
                                           weight_decay=self.weight_decay)
        self.enabled = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.head is None:
            return
        self.head.to(pl_module.device)
        if self._pending_state is not None:
            self.head.load_state_dict(self._pending_state["head"])
            self.optimizer.load_state_dict(self._pending_state["optimizer"])  # moves state to the head's device
            self._pending_state = None

    def state_dict(self) -> dict[str, Any]:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = dict(state_dict)

    def _batch_features(self, trainer, pl_module, batch, gather: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.enabled or "label" not in batch:
            return None
        with _encoder_eval(pl_module) as model:
            features = _features(trainer, model, batch["images"], self.pool)
        labels = torch.as_tensor(batch["label"], device=features.device)
        if gather:  # training batches have the same size on every rank (drop_last)
            return _gather(pl_module, features), _gather(pl_module, labels)
        return features, labels

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        found = self._batch_features(trainer, pl_module, batch, gather=True)
        if found is None:
            return
        features, labels = found
        self.head.train()
        with torch.enable_grad():
            logits = self.head(features.detach())
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        batch_size = features.shape[0]
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        pl_module.log("probe/linear_loss", loss.detach(), batch_size=batch_size)
        pl_module.log("probe/linear_train_top1", accuracy, batch_size=batch_size)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Class predictions (N,) of the probe for pooled features (N, D)."""
        self.head.eval()
        with torch.no_grad():
            return self.head(features.float()).argmax(dim=1)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_correct, self._val_count = 0, 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        found = self._batch_features(trainer, pl_module, batch, gather=False)
        if found is None:
            return
        features, labels = found
        self._val_correct += int((self.predict(features) == labels).sum())
        self._val_count += labels.numel()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.enabled:
            return
        counts = torch.tensor([self._val_correct, self._val_count], dtype=torch.float64, device=pl_module.device)
        correct, count = trainer.strategy.reduce(counts, reduce_op="sum").tolist()  # every rank's share
        if count > 0:
            self.last_top1 = correct / count
            pl_module.log("probe/linear_top1", self.last_top1)
