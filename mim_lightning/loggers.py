"""Loggers that keep a run's history when it resumes into the same run folder, and a W&B logger that falls back
to offline mode at once when the server cannot be reached."""

from __future__ import annotations

import csv
import io
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def _step(row: dict) -> float | None:
    try:
        return float(row.get("step") or "")
    except ValueError:
        return None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; this one appends to it, starting
    from the existing header so old and new columns are both kept.

    At the first metrics this process logs, at step ``S``, the file's rows of steps ``>= S`` (and a
    last row cut short by a kill) are dropped: they are the steps after the checkpoint the run
    resumed from, which this run logs again. Steps are logged in order, and a resumed run logs at
    its resumed step first (the step's own metrics, the monitor's mask statistics).
    """

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._resumed = False
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as stream:
                header = next(csv.reader(stream), [])
            self.metrics_keys = sorted(set(header))

    def _check_log_dir_exists(self) -> None:
        return None

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        if not self._resumed:
            self._resumed = True
            self.drop_rows_from(len(self.metrics) if step is None else step)
        super().log_metrics(metrics_dict, step)

    def drop_rows_from(self, step: int) -> int:
        """Remove the rows of steps ``>= step`` (and unreadable or truncated rows) from the file;
        returns how many were removed."""
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as stream:
            original = stream.read()
        text = original
        if text and not text.endswith("\n"):  # a row cut short by a kill -9
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        kept = [row for row in rows if None not in row and (s := _step(row)) is not None and s < step]
        removed = len(rows) - len(kept)
        if removed == 0 and text == original:
            return 0
        if not reader.fieldnames:  # not even a whole header: start the file afresh
            self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = []
            return removed
        tmp = f"{self.metrics_file_path}.{os.getpid()}.tmp"
        with self._fs.open(tmp, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=reader.fieldnames or self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        self._fs.mv(tmp, self.metrics_file_path)
        return removed


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to ``metrics.csv`` when a run resumes (``resume=auto``) in its folder.

    The rows of the steps after the checkpoint the run resumed from (logged before the interruption)
    are dropped when the resumed run logs its first step, so the file has each step once. Rows are
    written as they are logged: Lightning saves after each of its own logging calls, and
    ``flush_logs_every_n_steps=1`` does the same for rows callbacks log directly (learning rates, the
    mask statistics), so a kill -9 loses no row before the checkpoint.
    """

    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


#: How long a run waits to learn whether the W&B server can be reached before it logs offline.
WANDB_PROBE_SECONDS = 2.0


def wandb_server() -> tuple[str, int]:
    """Host and port of the W&B server (``WANDB_BASE_URL``, default ``https://api.wandb.ai``)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_api_key(host: str) -> str | None:
    """The stored W&B key: ``WANDB_API_KEY``, else the ``~/.netrc`` (``$NETRC``) entry ``wandb login`` writes."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry and entry[2] else None


def reachable(host: str, port: int, seconds: float = WANDB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``seconds`` (name lookup included: it runs in a
    thread, since ``getaddrinfo`` takes no timeout)."""
    import socket
    import threading

    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(result and result[0])


def wandb_offline(offline: bool, save_dir: str | None) -> bool:
    """Whether the W&B run logs offline: as asked (``offline``, ``WANDB_MODE``), else offline when the server
    cannot be reached within :data:`WANDB_PROBE_SECONDS` (one line says so and how to upload later), instead of
    wandb's ~100 s of retries. No stored key is one line (exit 2) unless the run is offline anyway."""
    from mim_lightning import runlog
    from mim_lightning.errors import ConfigError

    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if offline or mode in ("offline", "dryrun", "disabled"):
        return offline
    host, port = wandb_server()
    if wandb_api_key(host) is None:
        raise ConfigError("logger", "wandb", "WANDB_API_KEY=<key> or `wandb login` first, WANDB_MODE=offline "
                          "(upload later with `wandb sync`), or another logger (logger=csv)",
                          f"no W&B API key for {host} (WANDB_API_KEY or ~/.netrc)")
    if reachable(host, port):
        return False
    if mode == "online":
        raise ConfigError("logger", "wandb", "a reachable W&B server, or WANDB_MODE=offline (upload later with "
                          "`wandb sync`)", f"WANDB_MODE=online but {host}:{port} does not answer within "
                          f"{WANDB_PROBE_SECONDS:g} s")
    where = os.path.join(save_dir or ".", "wandb")
    runlog.warning(f"W&B: {host}:{port} does not answer within {WANDB_PROBE_SECONDS:g} s; logging offline to "
                   f"{where}; upload later with `wandb sync {where}/offline-run-*`")
    return True


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that never stalls on a missing network: see :func:`wandb_offline`."""

    def __init__(self, *args, offline: bool = False, save_dir: str = ".", **kwargs) -> None:
        super().__init__(*args, offline=wandb_offline(bool(offline), save_dir), save_dir=save_dir, **kwargs)
