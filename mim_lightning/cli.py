"""What the entry points share: one-line errors and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from mim_lightning.config import as_config_error, check_group_choices
from mim_lightning.errors import ConfigError

EXIT_CONFIG_ERROR = 2
EXIT_RUN_FAILED = 1


def fail(message: str, code: int) -> None:
    print(f"mim_lightning: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_argv(argv: list[str]) -> None:
    """Reject unknown ``group=option`` choices before Hydra prints its multi-line report."""
    try:
        check_group_choices(argv)
    except ConfigError as error:
        fail(str(error), EXIT_CONFIG_ERROR)


def run_or_exit(function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function``; a config problem prints one line and exits 2, a non-finite loss exits 1,
    SIGTERM/SIGUSR1 (after ``last.ckpt`` is written) exits 0."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from mim_lightning.methods.pretrain import NonFiniteLossError

    try:
        return function(*args)
    except SIGTERMException:
        print("mim_lightning: stopped by a signal; last.ckpt was written, resume with resume=auto run_dir=<this run>",
              file=sys.stderr, flush=True)
        sys.exit(0)
    except NonFiniteLossError as error:
        fail(str(error), EXIT_RUN_FAILED)
    except Exception as exc:  # noqa: BLE001 - anything that is not a config problem keeps its traceback
        error = as_config_error(exc)
        if error is None:
            raise
        fail(str(error), EXIT_CONFIG_ERROR)
