"""Writing files so that a reader, or a run killed mid-write, never sees half of one."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it to `path`.

    The temporary name is unique to this call, so two processes never write the same temporary
    file, and it is removed if `write` fails (the previous `path`, if any, stays as it was). A write
    that fails is an OSError naming `path`: torch.save's writer reports a full disk as a RuntimeError
    ("unexpected pos ..."), turned here into the OSError it is.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make results private to their writer
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
                f.flush()
            except RuntimeError as e:
                full = os.statvfs(path.parent).f_bavail == 0
                why = "No space left on device" if full else f"the write failed ({e})"
                raise OSError(errno.ENOSPC if full else errno.EIO, why, str(path)) from e
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, unique to this call (never another process's, even on a
    shared disk): write it in the block; it then takes `path`'s name in one rename, or is removed
    if the block fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _strict(value: Any) -> Any:
    """NaN and infinities as null: strict JSON, which every reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any], indent: int | None = 2) -> None:
    """Write `data` as strict JSON (non-finite numbers become null), atomically; indent=None writes
    it compactly, for a record too large to read by eye."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(_strict(data), indent=indent, separators=separators, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
