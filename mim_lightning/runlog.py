"""The run's own messages: one ``mim_lightning`` logger, printed on rank 0 and kept in the run's log file.

Under the entry points Hydra's job logging sends records to the console and to ``<run_dir>/<app>.log``
(``train.log``, ``finetune.log``). Through the Python API (no Hydra logging) :func:`attach_run_log`
adds a console handler and the log file itself, so a run always says what it does and keeps it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

LOGGER_NAME = "mim_lightning"
_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

logger = logging.getLogger(LOGGER_NAME)
logger.setLevel(logging.INFO)


def _root_handlers() -> list[logging.Handler]:
    return list(logging.getLogger().handlers)


@rank_zero_only
def info(message: str) -> None:
    """Log ``message`` on rank 0 (console and run log file)."""
    logger.info(message)


@rank_zero_only
def warning(message: str) -> None:
    """A warning line on rank 0 (console and run log file)."""
    logger.warning(message)


@rank_zero_only
def error(message: str) -> None:
    """An error line on rank 0 (console and run log file), e.g. why a run failed."""
    logger.error(message)


def _has_file_handler_for(path: Path) -> bool:
    for handler in [*_root_handlers(), *logger.handlers]:
        filename = getattr(handler, "baseFilename", None)
        if filename and Path(filename).resolve() == path.resolve():
            return True
    return False


@rank_zero_only
def attach_run_log(run_dir: str | Path, app: str) -> Path:
    """Make sure the run's messages reach the console and ``<run_dir>/<app>.log``; returns the log path.

    Hydra's job logging already writes that file for runs started from the command line; for a run
    started from Python the file handler is added here (and replaced when the next run starts).
    """
    path = Path(run_dir) / f"{app}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root_has_console = any(type(h) is logging.StreamHandler for h in _root_handlers())
    for handler in list(logger.handlers):
        if getattr(handler, "_mim_run_log", False):
            logger.removeHandler(handler)
            handler.close()
    if not root_has_console and not any(type(h) is logging.StreamHandler for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[mim_lightning] %(message)s"))
        logger.addHandler(console)
    if not _has_file_handler_for(path):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._mim_run_log = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return path
