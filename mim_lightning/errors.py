"""The one exception type for bad configuration and bad input.

Every user-facing check raises :class:`ConfigError` with the config key, the bad value and what is
allowed, so the entry points can print exactly one line and exit with status 2.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value or an input that mim_lightning cannot use.

    ``str(error)`` is a single line: ``<key>=<value!r>: <problem>; allowed: <allowed>``.
    """

    def __init__(self, key: str, value: Any, allowed: str, problem: str | None = None) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.problem = problem
        text = f"{key}={value!r}"
        if problem:
            text += f": {problem}"
        text += f"; allowed: {allowed}"
        super().__init__(" ".join(text.split()))


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient became NaN or infinite; the run stops instead of training on garbage."""


class DiskFullError(OSError):
    """A file of the run (a checkpoint) could not be written because its disk is full; ``str()`` is one line."""


def find_config_error(exc: BaseException) -> ConfigError | None:
    """Return the first :class:`ConfigError` in ``exc``'s cause/context chain (Hydra wraps them)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
