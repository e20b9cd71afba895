"""Checkpointing, seeding and interruption callbacks for every run."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends or is stopped
    by SIGTERM / SIGUSR1 / Ctrl-C.

    With ``every_n_train_steps`` Lightning saves only on those steps, so a short run (or the steps
    after the last multiple of N) would end with no checkpoint of its final weights. On a stop signal
    Lightning raises between two batches, where the state is consistent, and the checkpoint written then
    resumes exactly. A crash for any other reason (a non-finite loss included) writes nothing, so the
    last good checkpoint stays as it was.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_final(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            path = self._save_final(trainer)
            if path:
                rank_zero_info(f"[mim_lightning] interrupted at step {trainer.global_step}; saved {path}")

    def _save_final(self, trainer: pl.Trainer) -> str | None:
        if not self.save_last or trainer.global_step == 0 or self._last_global_step_saved == trainer.global_step:
            return None
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = trainer.global_step
        return self.last_model_path


class SeedPerRank(Callback):
    """Seed torch/numpy/python with ``seed + global_rank`` once ranks are known, and keep the random
    states in checkpoints so a resumed run continues the same random streams.

    Data crops and masks do not use these streams (they are seeded per sample); model-side draws do
    (drop-path, masks a model makes itself). A checkpoint holds rank 0's states; other ranks of a
    multi-process run re-derive theirs from ``(seed, rank, global_step)`` when resuming.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._rank = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank
        pl.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        # plain types and tensors only: Lightning loads checkpoints with torch.load(weights_only=True)
        numpy_state = {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        state = {"rank": self._rank, "torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("rank", 0) != self._rank:
            return  # re-derived in on_train_start from the restored step
        torch.set_rng_state(state_dict["torch"])
        saved = state_dict["numpy"]
        np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                             saved["cached_gaussian"]))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rank != 0 and trainer.global_step > 0:
            pl.seed_everything(self.seed + 1000003 * trainer.global_step + trainer.global_rank, workers=True, verbose=False)


class StopOnSignal(Callback):
    """Treat SIGUSR1 like SIGTERM: finish the current batch, save ``last.ckpt`` and stop cleanly.

    Lightning already does this for SIGTERM, and under SLURM with auto-requeue it handles SIGUSR1
    itself (saving an ``hpc_ckpt`` and requeueing); this callback covers SIGUSR1 everywhere else.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1",)) -> None:
        self.signals = tuple(signals)
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None or not hasattr(signal, "SIGUSR1"):
            return
        for name in self.signals:
            signum = getattr(signal, name)
            current = signal.getsignal(signum)
            if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
                continue  # someone (Lightning's SLURM requeue) handles it already
            self._previous[signum] = current

            def handler(received: int, frame: Any, connector=connector) -> None:
                rank_zero_info(f"[mim_lightning] received {signal.Signals(received).name}: stopping after this batch")
                connector.received_sigterm = True

            signal.signal(signum, handler)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest usable checkpoint in ``folder`` (by modification time), or None.

    Checkpoints are written atomically, so a damaged one means a damaged disk or a copied fragment;
    it is reported and the next newest is used.
    """
    from mim_lightning.checkpoint_io import checkpoint_problem

    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")]
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        rank_zero_info(f"[mim_lightning] skipping unusable checkpoint {path}: {problem}")
    return None
