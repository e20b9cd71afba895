"""Checkpoint files written atomically: a crash mid-write never leaves a truncated ``.ckpt``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file in the target folder, fsync, then ``os.replace`` onto the final name.

    ``os.replace`` is atomic on POSIX and Windows within one file system, so readers see either the
    old complete checkpoint or the new complete one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a usable checkpoint (missing, empty, truncated, corrupt), or None if it loads.

    A sharded FSDP checkpoint (a ``*.ckpt`` folder holding ``meta.pt``) counts as usable without loading it.
    """
    import zipfile

    path = Path(path)
    if path.is_dir():
        # a sharded (FSDP) checkpoint: a folder with Lightning's metadata file and one shard per rank
        return None if (path / "meta.pt").is_file() else "a folder that is not a sharded checkpoint (no meta.pt)"
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "empty file"
    if not zipfile.is_zipfile(path):
        return "truncated or not a torch checkpoint (no zip directory)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"corrupt member {bad}"
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - every failure means the same thing to the user
        return f"unreadable ({type(exc).__name__}: {exc})".splitlines()[0]
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "not a Lightning checkpoint (no state_dict)"
    return None
