"""Reading the sharded checkpoint folder of a ``trainer=fsdp`` run on one process (export, finetuning, resume),
without a process group. Writing it is the FSDP2 strategy's job (:mod:`mim_lightning.parallel`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "meta.pt").is_file() and (path / ".metadata").is_file()


def load_sharded(path: str | os.PathLike, keys: Iterable[str] = ("state_dict",)) -> dict[str, Any]:
    """A sharded checkpoint folder as the dict a single-file Lightning checkpoint holds (``meta.pt`` plus the
    full, unsharded ``keys`` from the shards), on one process, without a process group. Tensors come back
    whole and on the CPU, with the same keys a DDP checkpoint's ``state_dict`` has."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    path = Path(path)
    checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    loaded = _load_state_dict_from_keys(keys=set(keys), storage_reader=FileSystemReader(str(path)))
    checkpoint.update(loaded)
    return checkpoint
