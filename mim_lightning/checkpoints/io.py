"""Checkpoint files written atomically: a crash mid-write never leaves a truncated ``.ckpt``."""

from __future__ import annotations

import errno
import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mim_lightning.errors import DiskFullError

#: Temporary files of an unfinished save: ``.<final name>.<8 random characters>.tmp`` (the same form
#: ``tempfile.mkstemp`` gave earlier versions, so their leftovers match too).
TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file in the target folder, fsync, then ``os.replace`` onto the final name.

    ``os.replace`` is atomic on POSIX and Windows within one file system, so readers see either the
    old complete checkpoint or the new complete one. Files and folders get the permissions of a plain
    ``open()`` / ``mkdir``: ``0o666`` / ``0o777`` less the umask (``0o644`` / ``0o755`` with umask 022).
    A save killed before the rename leaves a ``TEMP_PATTERN`` file, which :func:`remove_temp_files`
    deletes at the next run's start. A full disk (``ENOSPC``, also inside torch's ``RuntimeError``) raises
    :class:`~mim_lightning.errors.DiskFullError` with one line naming the file; the old checkpoint stays.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = _create_temp(target)
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp_name, target)
        except BaseException as exc:
            Path(tmp_name).unlink(missing_ok=True)
            if isinstance(exc, (OSError, RuntimeError)) and disk_full(exc, target.parent):
                raise DiskFullError(errno.ENOSPC, full_disk_message(target)) from exc
            raise
        _fsync_folder(target.parent)  # the rename itself survives a power loss


#: errno values of a full disk or an exhausted quota.
FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write was a full disk: an ``ENOSPC``/``EDQUOT`` OSError in the exception's chain, or torch's
    zip writer failing (``unexpected pos ...``, ``failed writing``; it wraps the OSError in a RuntimeError) while
    the folder's disk has less than 64 MiB free."""
    import shutil

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS or "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "failed writing" in text):
        try:
            return shutil.disk_usage(folder).free < 64 * 2**20
        except OSError:
            return False
    return False


def full_disk_message(target: Path) -> str:
    import shutil

    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return (f"cannot write checkpoint {target}: the disk is full (No space left on device; {free}). The checkpoints "
            "written before are intact; free space (or set callbacks.checkpoint.dirpath to another disk), then "
            "continue with resume=auto")


def _create_temp(target: Path) -> tuple[int, str]:
    """A new ``TEMP_PATTERN`` file beside ``target``, opened for writing with mode ``0o666`` less the umask
    (``tempfile.mkstemp`` would force ``0o600``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        name = str(target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def remove_temp_files(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """Delete the temporary files that interrupted saves left in ``folder`` (only names matching
    ``TEMP_PATTERN``, files or sharded-checkpoint folders; a ``OLD_PATTERN`` folder whose checkpoint is missing is
    renamed back); returns each deleted path with its size in bytes. Call it before the run's first save."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink() and (TEMP_PATTERN.match(path.name) or OLD_PATTERN.match(path.name)):
            removed.extend(_settle_folder(path))
            continue
        if not TEMP_PATTERN.match(path.name) or path.is_symlink() or not path.is_file():
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append((path, size))
    return removed


#: A sharded checkpoint folder moved aside while its replacement was renamed in (``FSDP2Strategy.save_checkpoint``).
OLD_PATTERN = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.old$")


def _settle_folder(path: Path) -> list[tuple[Path, int]]:
    """A temporary folder of an interrupted sharded save is deleted; a replaced one (``.old``) is deleted, or put
    back under its name when a crash came between the two renames and that name is missing."""
    import shutil

    old = OLD_PATTERN.match(path.name)
    if old is not None and not (path.parent / old.group("target")).exists():
        os.replace(path, path.parent / old.group("target"))
        return []
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shutil.rmtree(path, ignore_errors=True)
    return [(path, size)]


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a usable checkpoint (missing, empty, truncated, corrupt), or None if it loads.

    A sharded checkpoint (a ``*.ckpt`` folder holding ``meta.pt``; for FSDP2 also the distributed checkpoint's
    ``.metadata``) counts as usable without loading the shards.
    """
    import zipfile

    path = Path(path)
    if path.is_dir():
        # a sharded checkpoint: Lightning's meta.pt, one shard per rank and (torch distributed checkpoint, FSDP2)
        # the .metadata index written when every shard is complete
        if not (path / "meta.pt").is_file():
            return "a folder that is not a sharded checkpoint (no meta.pt)"
        if any(path.glob("*.distcp")) and not (path / ".metadata").is_file():
            return "an incomplete sharded checkpoint (no .metadata index)"
        return None
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
