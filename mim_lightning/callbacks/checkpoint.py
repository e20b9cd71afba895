"""Checkpointing, seeding and interruption callbacks for every run."""

from __future__ import annotations

import random
import re
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mim_lightning import runlog
from mim_lightning.errors import ConfigError

KEEP_LAST_K_KEY = "callbacks.checkpoint.keep_last_k"
KEEP_LAST_K_ALLOWED = "an integer >= 0 (step snapshots kept besides last.ckpt), or -1 to keep every snapshot"


def check_keep_last_k(value: Any, key: str = KEEP_LAST_K_KEY) -> int:
    """``value`` as a snapshot count: ``-1`` (keep all), ``0`` (only ``last.ckpt``) or ``K > 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < -1:
        raise ConfigError(key, value, KEEP_LAST_K_ALLOWED)
    return int(value)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that keeps ``last.ckpt`` plus the newest ``keep_last_k`` step
    snapshots, and also writes ``last.ckpt`` when training ends or is stopped by SIGTERM / SIGUSR1 / Ctrl-C.

    Retention (without ``monitor``): after each new snapshot is completely written (atomically, by
    ``AtomicCheckpointIO``), rank 0 deletes the older snapshots in ``dirpath`` beyond the newest
    ``keep_last_k``, newest by modification time as :func:`last_checkpoint` orders them. It looks at the
    folder, not at a list it kept, so snapshots of an earlier, interrupted run of the same folder are
    pruned too. Only files named after ``filename`` are snapshots; ``last.ckpt`` and the checkpoint this
    run resumed from are never deleted. ``-1`` keeps every snapshot, ``0`` only ``last.ckpt``.
    ``save_top_k`` without ``monitor`` is accepted as a synonym (Lightning allows -1, 0, 1 there); with a
    ``monitor`` Lightning's own best-``save_top_k`` applies and ``keep_last_k`` must stay unset.

    At the start of a fit, rank 0 removes the temporary files that a save killed mid-write left in
    ``dirpath`` (names matching ``AtomicCheckpointIO``'s pattern only) and logs what it removed.

    With ``every_n_train_steps`` Lightning saves only on those steps, so a short run (or the steps
    after the last multiple of N) would end with no checkpoint of its final weights. On a stop signal
    Lightning raises between two batches, where the state is consistent, and the checkpoint written then
    resumes exactly. A crash for any other reason (a non-finite loss included) writes nothing, so the
    last good checkpoint stays as it was.
    """

    def __init__(self, dirpath: Any = None, filename: str | None = None, *, keep_last_k: Any = None,
                 save_top_k: Any = None, monitor: str | None = None, **kwargs: Any) -> None:
        if monitor is not None:
            if keep_last_k is not None:
                raise ConfigError(KEEP_LAST_K_KEY, keep_last_k, "null when callbacks.checkpoint.monitor is set",
                                  "with a monitor, save_top_k keeps the best checkpoints")
            self.keep_last_k: int | None = None
            lightning_top_k = 1 if save_top_k is None else save_top_k
        else:
            if keep_last_k is None:
                keep_last_k = 2 if save_top_k is None else save_top_k
            elif save_top_k is not None and save_top_k != keep_last_k:
                raise ConfigError("callbacks.checkpoint.save_top_k", save_top_k,
                                  f"unset, or equal to keep_last_k ({keep_last_k!r})",
                                  "without a monitor save_top_k is a synonym of keep_last_k")
            self.keep_last_k = check_keep_last_k(keep_last_k)
            # Lightning writes every snapshot (or none); the pruning is ours
            lightning_top_k = 0 if self.keep_last_k == 0 else -1
        # last.ckpt always names the newest checkpoint: no last-v1.ckpt beside a last.ckpt that a copied or
        # moved run folder brought along (Lightning would not overwrite a file it did not write itself)
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, save_top_k=lightning_top_k, **kwargs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath and _is_local_file_protocol(self.dirpath):
            from mim_lightning.checkpoints.io import remove_temp_files

            removed = remove_temp_files(self.dirpath)
            if removed:
                size = sum(nbytes for _, nbytes in removed)
                names = ", ".join(path.name for path, _ in removed)
                runlog.info(f"removed {len(removed)} temporary file(s) of an interrupted checkpoint save from "
                            f"{self.dirpath} ({size / 2**20:.1f} MiB): {names}")

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self.keep_last_k and self.keep_last_k > 0 and trainer.is_global_zero:
            self._prune(trainer)

    def snapshots(self) -> list[Path]:
        """The step snapshots in ``dirpath`` (files named after ``filename``, ``last*.ckpt`` excluded),
        newest first."""
        if not self.dirpath or not _is_local_file_protocol(self.dirpath) or not Path(self.dirpath).is_dir():
            return []
        folder = Path(self.dirpath)
        template = self.filename or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"
        pattern = re.compile(self._name_regex(template))
        last = re.compile(rf"^{re.escape(self.CHECKPOINT_NAME_LAST)}(-v\d+)?{re.escape(self.FILE_EXTENSION)}$")
        found = []
        for path in (folder.rglob if "/" in template else folder.glob)(f"*{self.FILE_EXTENSION}"):
            relative = path.relative_to(folder).as_posix()
            if pattern.match(relative) and not last.match(path.name) and not path.name.startswith("."):
                try:
                    found.append((path.stat().st_mtime_ns, path.name, path))
                except FileNotFoundError:
                    continue
        return [path for _, _, path in sorted(found, reverse=True)]

    def _name_regex(self, template: str) -> str:
        """A regex for the names Lightning makes from ``template`` (any metric values, version suffix)."""
        regex = ""
        for part in re.split(r"(\{[^}]*\})", template):
            if part.startswith("{") and part.endswith("}"):
                name = part[1:-1].split(":")[0]
                regex += (re.escape(name + self.CHECKPOINT_EQUALS_CHAR) if self.auto_insert_metric_name else "") + ".+?"
            else:
                regex += re.escape(part)
        return rf"^{regex}({re.escape(self.CHECKPOINT_JOIN_CHAR)}v\d+)?{re.escape(self.FILE_EXTENSION)}$"

    def _prune(self, trainer: pl.Trainer) -> None:
        newest = Path(self._last_checkpoint_saved).resolve() if self._last_checkpoint_saved else None
        if newest is None or not newest.exists():
            return  # delete nothing until the new snapshot is complete on disk
        keep = {newest}
        for path in (self.last_model_path, trainer.ckpt_path):  # ckpt_path: the run resumed from it
            if path:
                keep.add(Path(path).resolve())
        others = [path for path in self.snapshots() if path.resolve() != newest]
        for path in others[self.keep_last_k - 1:]:
            if path.resolve() not in keep:
                trainer.strategy.remove_checkpoint(path)

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
    """Treat SIGUSR1 and Ctrl-C (SIGINT) like SIGTERM: finish the current batch, save ``last.ckpt`` and stop
    cleanly (the entry points then exit 0 with the resume command).

    Lightning already does this for SIGTERM, and under SLURM with auto-requeue it handles SIGUSR1
    itself (saving an ``hpc_ckpt`` and requeueing); this callback covers SIGUSR1 everywhere else. Lightning
    would turn Ctrl-C into ``KeyboardInterrupt`` and exit 1; here the first Ctrl-C stops after the batch and puts
    the previous handler back, so a second one interrupts at once. DataLoader workers forked after the handler is
    set inherit it, so a terminal's Ctrl-C (sent to the whole process group) does not kill them.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGINT")) -> None:
        self.signals = tuple(signals)
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None or not hasattr(signal, "SIGUSR1"):
            return
        for name in self.signals:
            signum = getattr(signal, name)
            current = signal.getsignal(signum)
            if current not in (signal.SIG_DFL, signal.SIG_IGN, None, signal.default_int_handler):
                continue  # someone (Lightning's SLURM requeue) handles it already
            self._previous[signum] = current

            def handler(received: int, frame: Any, connector=connector, previous=current) -> None:
                rank_zero_info(f"[mim_lightning] received {signal.Signals(received).name}: stopping after this batch")
                connector.received_sigterm = True
                if received == signal.SIGINT:
                    signal.signal(received, previous)  # a second Ctrl-C interrupts at once

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
    from mim_lightning.checkpoints.io import checkpoint_problem

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
