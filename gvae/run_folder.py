"""A run's folder, owned by one process at a time: locked, checked, then recorded.

Left to itself, Hydra writes `.hydra/` and opens `train.log` in the folder before gvae sees the
config, so a refused run (another run's checkpoint there, a typo) would already have rewritten the
record of the results in it. gvae turns both off (`hydra.output_subdir: null`, train.log's handler
in configs/config.yaml) and writes them itself once the folder is the run's to write: its lock
taken, its config valid, a checkpoint there compatible. A refused run leaves the folder byte for
byte as it was.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from gvae.errors import GvaeError, Interrupted, Stopped
from gvae.files import atomic_write, write_json

log = logging.getLogger(__name__)

HOLDER = "running.json"  # who holds the lock: for the message of a run that finds it taken
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's


@contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """Inside the block, the log also goes to `path` (appended: a resumed run continues its log),
    formatted as Hydra formats it."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


class FolderBusy(GvaeError):
    """Another live process holds the run folder; the message names the folder and the holder."""


class JobFailed(CompactHydraException):
    """A multirun job's failure as one line, which Hydra prints instead of a traceback."""


class RunExists(GvaeError):
    """The folder holds a run that a new run would overwrite; the message says how to go on."""


# What a run writes in its folder besides its record (.hydra/): what replacing it deletes.
RUN_OUTPUTS = ("checkpoints", "metrics.json", "eval.json", "failed.json", "events.out.tfevents.*", "*.png",
               "pictures.json", "*.log")


def held_run(path: Path) -> str | None:
    """What run the folder holds (a finished one, a checkpoint, an evaluation), in words, or None."""
    try:
        metrics = json.loads((path / "metrics.json").read_text())
        if metrics.get("status") == "complete":
            return f"a finished run ({metrics.get('step')} steps, metrics.json)"
    except (OSError, ValueError, AttributeError):
        pass
    for name, what in (("checkpoints/last.pt", "a run's checkpoint"), ("metrics.json", "a run's metrics"),
                       ("eval.json", "an evaluation")):
        if (path / name).exists():
            return f"{what} ({name})"
    return None


def clear_outputs(path: Path) -> None:
    """Delete what a run wrote in the folder (RUN_OUTPUTS), for a run that replaces it on purpose."""
    for pattern in RUN_OUTPUTS:
        for item in path.glob(pattern):
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()


class RunFolder:
    """Use as a context manager: the folder's exclusive lock for the block. The lock is flock(2) on
    the folder itself, so taking it writes nothing, and the operating system releases it when the
    process dies, however it dies."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self.recorded = False

    def __enter__(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(f"{self.path} is in use by another run ({self.holder()}): one run per "
                             "folder at a time. Wait for it to end, or choose another folder "
                             "(hydra.run.dir, or hydra.sweep.dir for a sweep).") from None
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            return describe_holder(json.loads((self.path / HOLDER).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not yet said which"

    def record(self, task_cfg: DictConfig, hydra_cfg: DictConfig | None) -> None:
        """The run is accepted: write the holder and Hydra's record of the config (`.hydra/config.yaml`,
        `hydra.yaml`, `overrides.yaml`, as Hydra writes them)."""
        write_json(self.path / HOLDER, {"pid": os.getpid(), "host": socket.gethostname(),
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                        "command": [Path(sys.argv[0]).name, *sys.argv[1:]]})
        hydra_dir = self.path / ".hydra"
        hydra_dir.mkdir(exist_ok=True)
        files: dict[str, Any] = {"config.yaml": task_cfg}
        if hydra_cfg is not None:
            files["hydra.yaml"] = OmegaConf.create({"hydra": hydra_cfg})
            files["overrides.yaml"] = hydra_cfg.overrides.task
        for name, node in files.items():
            text = OmegaConf.to_yaml(node)
            atomic_write(hydra_dir / name, lambda f, text=text: f.write(text.encode()))
        self.recorded = True

    def __exit__(self, *exc: object) -> None:
        if self.recorded:
            (self.path / HOLDER).unlink(missing_ok=True)
        elif not any(self.path.iterdir()):
            self.path.rmdir()  # refused in a folder made for it: nothing to keep
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# What does not make a sweep's job another job: resuming it, replacing it, where Hydra puts it.
NOT_SETTINGS = ("train.resume", "train.overwrite", "hydra.")


def job_settings(overrides: list[str]) -> frozenset[str]:
    return frozenset(o for o in overrides if not o.lstrip("+~").startswith(NOT_SETTINGS))


def same_run(a: frozenset[str], b: frozenset[str]) -> bool:
    """Whether two jobs' settings differ only in keys that do not define the run (its length,
    cadences, evaluation: gvae/roles.py), so that one resumes the other's checkpoint."""
    from gvae.roles import role_of  # the schema's roles; imported only when a folder is in doubt

    for override in a ^ b:
        role = role_of(schema_defaults(), override.lstrip("+~").split("=", 1)[0])
        if role is None or role.defines_run:  # a key gvae does not know counts as defining
            return False
    return True


@functools.cache
def schema_defaults() -> Any:
    from gvae.config import Config

    return Config()


def sweep_job_folder(hydra_cfg: Any) -> Path:
    """The folder of a sweep's job (its HydraConfig): found by its settings (find_job_folder) unless
    the sweep sets its jobs' folders itself (hydra.sweep.subdir, as a halving's rungs do)."""
    assigned = Path(hydra_cfg.runtime.output_dir)
    if any(o.startswith("hydra.sweep.subdir=") for o in hydra_cfg.overrides.hydra):
        return assigned
    return find_job_folder(assigned, list(hydra_cfg.overrides.task))


def find_job_folder(assigned: Path, overrides: list[str]) -> Path:
    """A sweep's job's folder, found by its settings: Hydra numbers jobs by their place in the grid,
    which moves when values are added to a swept key. In order: a folder holding a run of exactly
    these settings (the assigned one first); the assigned folder if it holds no run, or the same run
    at another length or cadence (a sweep resumed with train.max_steps raised); the one other folder
    holding that run; else the next free number."""
    if not assigned.parent.is_dir():
        return assigned
    wanted, numbered, records = job_settings(overrides), [], {}
    for folder in assigned.parent.iterdir():
        if folder.name.isdigit():
            numbered.append(int(folder.name))
        record = folder / ".hydra" / "overrides.yaml"
        if record.is_file():
            try:
                records[folder] = job_settings([str(o) for o in OmegaConf.load(record)])
            except Exception:  # noqa: BLE001  (a damaged record is not this job's: the job's own run reads it)
                continue
    exact = [f for f, settings in records.items() if settings == wanted]
    if exact:
        return assigned if assigned in exact else exact[0]
    if not (assigned / ".hydra" / "overrides.yaml").is_file():
        return assigned
    resumed = [f for f, settings in records.items() if same_run(settings, wanted)]
    if assigned in resumed or len(resumed) == 1:
        return assigned if assigned in resumed else resumed[0]
    number = max(numbered, default=-1) + 1
    while True:  # reserved by making it (jobs prepared together must not pick the same number)
        try:
            (assigned.parent / str(number)).mkdir()
            return assigned.parent / str(number)
        except FileExistsError:
            number += 1


def remove_if_empty(path: Path) -> None:
    """Remove a run folder that holds nothing (Hydra makes the folder before the run is checked)."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


# -----------------------------------------------------------------------------
# how a run ends when it cannot finish


@contextmanager
def handling_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """Inside the block SIGTERM and SIGINT call handler(signum); the previous handlers come back
    afterwards. Only the main thread may set handlers, so elsewhere signals act as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda signum, frame: handler(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler_before in previous.items():
            signal.signal(s, signal.SIG_DFL if handler_before is None else handler_before)


@contextmanager
def signals_raise_stopped() -> Iterator[None]:
    """SIGTERM and SIGINT raise Stopped for the block, so that a signal during start-up or the final
    evaluation still ends with the run's message and record (the training loop defers them further,
    to checkpoint first)."""
    def stop(signum: int) -> None:
        raise Stopped(signum)

    with handling_signals(stop):
        yield


def live_holder(path: Path) -> str | None:
    """The holder's description (describe_holder) when the folder's holder record names a process
    alive on this machine, else None. Read, not locked: taking the folder's lock to test it could turn
    away a run starting in that instant. (A process that died without removing the record and whose
    number was reused since would count as alive.)"""
    try:
        info = json.loads((path / HOLDER).read_text())
        pid, host = int(info["pid"]), info["host"]
    except (OSError, ValueError, KeyError, TypeError):  # none, or being written
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    try:
        return describe_holder(info)
    except (KeyError, TypeError):
        return f"process {pid} on {host}"


def describe_holder(info: dict[str, Any]) -> str:
    """A holder record (RunFolder.record writes it) in words, as busy-folder messages name it."""
    return f"process {info['pid']} on {info['host']}, started {info['started']}: {' '.join(info['command'])}"


def describe_failure(error: BaseException, out_dir: Path) -> tuple[str, str, int]:
    """(status for failed.json, the one-line message, the exit status) of a run ended by `error`."""
    checkpoint = out_dir / "checkpoints" / "last.pt"
    kept = f"{checkpoint} is kept" if checkpoint.is_file() else "no checkpoint had been written"
    if isinstance(error, Interrupted):  # the loop's: it says what it saved
        return "interrupted", str(error), 128 + error.signum
    if isinstance(error, (Stopped, KeyboardInterrupt)):
        signum = getattr(error, "signum", signal.SIGINT)
        return "interrupted", (f"{signal.Signals(signum).name} outside the training loop (start-up or "
                               f"the final evaluation); {kept}. Run the same command with "
                               "train.resume=true to continue."), 128 + signum
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return "failed", (f"file system error: {where}{error.strerror or error}; {kept}. Free space or "
                          "fix the folder's permissions, then run again with train.resume=true."), 1
    if not isinstance(error, GvaeError):  # not a failure gvae knows: say what it was
        return "failed", (f"unexpected {type(error).__name__}: {error}; {kept}. This is a bug in gvae or "
                          "in an estimator of yours: please report it with the run's log."), 1
    return "failed", str(error), 1


def write_failure(out_dir: Path, status: str, message: str, error: BaseException) -> None:
    """failed.json: what happened ("ErrorClass: message"), and what was kept. If even that cannot be
    written (a full disk), the message has been logged and printed: all there is left to do."""
    try:
        write_json(out_dir / "failed.json", {"status": status, "error": f"{type(error).__name__}: {message}"})
    except OSError as e:
        log.error("could not write %s either: %s", out_dir / "failed.json", e)
