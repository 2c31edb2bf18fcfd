"""The failures gvae reports as one clear message instead of a traceback."""

from __future__ import annotations

import signal
from typing import Any


class GvaeError(RuntimeError):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(GvaeError):
    """A configuration value is out of range or unsupported; the message names the key."""


class DataError(GvaeError):
    """The dataset's files are missing, truncated or corrupt; the message names the file."""


class CheckpointError(GvaeError):
    """A checkpoint does not match the run that tries to load it."""


class NonFiniteError(GvaeError):
    """The loss or the parameters became NaN or infinite."""


class Interrupted(GvaeError):
    """SIGTERM or SIGINT stopped training after a checkpoint; `signum` is the signal received."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    def __reduce__(self):  # across a process boundary (a worker's result): both arguments
        return type(self), (str(self), self.signum)


class Stopped(BaseException):
    """SIGTERM or SIGINT outside the training loop (start-up, the final evaluation): raised by the
    handler gvae-train installs, so that the run still ends with its message and record."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):  # its args hold the signal's name, __init__ takes its number
        return type(self), (self.signum,)


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """ConfigError "key=value is not allowed: allowed" unless ok."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
