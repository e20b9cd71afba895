"""One live run per run folder: ``<run_dir>/.lock``.

A run holds an exclusive ``fcntl.flock`` on ``<run_dir>/.lock`` for its whole life, with its pid, host and start
time written in the file for the message a second run prints. The kernel drops the lock when the process ends in
any way (kill -9, a crash, a power loss), so a dead run never leaves its folder locked: the file stays, its old
content is overwritten by the next owner. A second run on a locked folder, fresh or ``resume=auto``, is refused
with one line naming ``run_dir`` and the owner's pid (:class:`~mim_lightning.errors.ConfigError`, exit 2).

Only the global rank 0 takes the lock (DDP ranks and the other nodes of a run share the folder, and Lightning's
launcher starts the local ranks by re-running the command line). Across machines this relies on the shared
filesystem's locking: NFSv4 (and NFSv3 with ``lockd``) map ``flock`` to byte-range locks that other clients see;
some filesystems (Lustre mounted without ``flock``, some FUSE mounts) refuse it (``ENOLCK``/``EOPNOTSUPP``), where
the run goes on unlocked after a one-line warning, and a few only lock on the local machine, where two runs
started on different machines are not refused.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mim_lightning import runlog
from mim_lightning.errors import ConfigError

LOCK_NAME = ".lock"
#: Environment variables that name a process's global rank (or its node); all 0 or unset on the global rank 0.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "JSM_NAMESPACE_RANK")

#: The locks this process holds, by resolved folder (a process takes its folder's lock once).
_held: dict[str, int] = {}


def is_global_zero() -> bool:
    return all(os.environ.get(name, "0") in ("0", "") for name in RANK_VARIABLES)


def owner_of(path: Path) -> str:
    """What the lock file says about its owner (``pid 123 on host, since ...``)."""
    try:
        fields = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    except OSError:
        fields = {}
    pid = fields.get("pid", "?")
    where = f" on {fields['host']}" if fields.get("host") else ""
    since = f", started {fields['started']}" if fields.get("started") else ""
    return f"pid {pid}{where}{since}"


def lock_run_dir(run_dir: str | os.PathLike) -> bool:
    """Take ``<run_dir>/.lock`` for this process's life (created with the folder if missing); True if this process
    holds it now. Raises :class:`ConfigError` when a live process holds it. Other ranks than the global 0 take
    nothing (False)."""
    import fcntl

    if not is_global_zero():
        return False
    folder = Path(run_dir).expanduser().resolve()
    if str(folder) in _held:
        return True
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(handle)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError("run_dir", str(run_dir), "another run_dir, or the same once that run has ended "
                              "(resume=auto then continues it)",
                              f"in use by a live run ({owner_of(path)}; its lock is {path})") from None
        runlog.warning(f"run_dir={run_dir}: this filesystem cannot lock {path} ({error.strerror}); a second run "
                       "on this folder would not be refused")
        return False
    os.ftruncate(handle, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(handle, f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted={started}\n".encode())
    os.fsync(handle)
    _held[str(folder)] = handle  # kept open: the lock lives as long as the descriptor
    return True


def unlock_run_dir(run_dir: str | os.PathLike) -> None:
    """Give the lock back (the end of a run in a process that goes on: a sweep, a notebook)."""
    import fcntl

    handle = _held.pop(str(Path(run_dir).expanduser().resolve()), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


@contextmanager
def run_dir_locked(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of ``run_dir`` inside the block; one this process held already is kept after it."""
    already = str(Path(run_dir).expanduser().resolve()) in _held
    lock_run_dir(run_dir)
    try:
        yield
    finally:
        if not already:
            unlock_run_dir(run_dir)
