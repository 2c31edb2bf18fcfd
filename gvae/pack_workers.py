"""Packs trained at once in worker processes, each with its share of the CPU's threads: how the packed
launcher (hydra_plugins/gvae_plugins/packed_launcher.py) uses a CPU's cores.

On this project's 2-core CPU, two single-thread processes each training a pack of 8 of the default
model trained more model-steps per second than one pack of 16 on two threads in three runs of four
(scripts/bench.py --sweep, README "A sweep's use of the two cores"): the threads of one process share
out each small product, and the step's other kernels, about a third of its time, hardly use a second
thread at all.

The parent keeps every job's folder lock and record (gvae/jobs.py); a worker trains the packs it is
given, writes each run's folder as a pack in the parent would, and returns each run's result or the
pack's error. Signals: a worker ignores SIGINT and SIGTERM between packs, and the parent forwards the
one it receives, so that the packs in training checkpoint and return Interrupted while the packs not
yet started are not started (they return Stopped).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gvae.errors import GvaeError, Stopped
from gvae.run_folder import LOG_FORMAT, handling_signals, logging_to, signals_raise_stopped

log = logging.getLogger(__name__)


@dataclass
class PackTask:
    """A pack for a worker: its key (the launcher's), its runs as the parent opened them
    (gvae.jobs.OpenedRun: configs, folders, checkpoints), their command lines' settings, and the jobs'
    log files."""

    key: int
    opened: list[Any]
    settings: list[dict[str, Any]]
    logs: list[Path]


class WorkerLost(GvaeError):
    """The process training a pack ended without returning (killed: out of memory, a signal)."""


def train_task(task: PackTask, stopping: Any = None) -> list[Any] | BaseException:
    """Train the pack (gvae.jobs.train_opened): each run's metrics or NonFiniteError, or the error
    that ended the pack, returned rather than raised, in a form that crosses a process boundary.
    `stopping`: the shared signal number the parent sets before it forwards a signal; read once the
    handlers are in place, so that a signal ignored just before cannot let the pack train on."""
    from gvae.jobs import record_divergence, train_opened

    try:
        with signals_raise_stopped(), ExitStack() as logs:
            if stopping is not None and stopping.value:
                raise Stopped(stopping.value)
            for path in task.logs:
                logs.enter_context(logging_to(path))
            return train_opened(task.opened, task.settings, on_failure=record_divergence)
    except BaseException as e:  # noqa: BLE001  (returned: the parent fails this pack's jobs)
        return transportable(e)


def transportable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeError naming its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001  (any error of pickling: replaced)
        return RuntimeError(f"{type(error).__name__}: {error}")


def serve(index: int, threads: int, tasks: Any, results: Any, stopping: Any) -> None:
    """A worker's life: take packs until told to end (None), reporting when each starts and ends."""
    for s in (signal.SIGINT, signal.SIGTERM):  # between packs the parent decides (PackWorkers.stop)
        signal.signal(s, signal.SIG_IGN)
    os.environ["TQDM_POSITION"] = str(index)  # a progress bar's line of its own per worker
    import torch

    torch.set_num_threads(threads)
    handler = logging.StreamHandler(sys.stdout)  # as Hydra's console handler writes
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    while (task := tasks.get()) is not None:
        results.put(("started", task.key, os.getpid(), None))
        outcome = train_task(task, stopping)
        results.put(("done", task.key, os.getpid(), outcome))


class PackWorkers:
    """`count` worker processes (spawned: a fresh interpreter, safe with threads and CUDA), each with
    `threads` threads. Use as a context manager; `train` yields each pack's outcome as it ends."""

    def __init__(self, count: int, threads: int):
        context = multiprocessing.get_context("spawn")
        self.tasks, self.results = context.Queue(), context.Queue()
        self.stopping = context.Value("i", 0)  # the signal being forwarded; 0 while none
        self.procs = [context.Process(target=serve, name=f"gvae-pack-worker-{i}", daemon=True,
                                      args=(i, threads, self.tasks, self.results, self.stopping))
                      for i in range(count)]

    def __enter__(self) -> PackWorkers:
        for proc in self.procs:
            proc.start()
        return self

    def train(self, tasks: list[PackTask]) -> Iterator[tuple[int, list[Any] | BaseException]]:
        """(key, outcome) for every task, as each pack ends; a pack whose worker died: WorkerLost."""
        for task in tasks:
            self.tasks.put(task)
        for _ in self.procs:
            self.tasks.put(None)
        pending, running = {task.key for task in tasks}, {}  # running: worker pid -> its pack's key
        while pending:
            try:
                kind, key, pid, outcome = self.results.get(timeout=1.0)
            except queue.Empty:
                yield from self._lost(pending, running)
                continue
            if kind == "started":
                running[pid] = key
                continue
            running.pop(pid, None)
            pending.discard(key)
            yield key, outcome

    def _lost(self, pending: set[int], running: dict[int, int]) -> Iterator[tuple[int, WorkerLost]]:
        """The packs of workers that died; all that are left when none is alive."""
        dead = [proc for proc in self.procs if not proc.is_alive() and proc.exitcode]
        for proc in dead:
            if (key := running.pop(proc.pid, None)) is not None:
                pending.discard(key)
                yield key, WorkerLost(f"the worker process training this pack ended with exit code "
                                      f"{proc.exitcode}{killed_by(proc.exitcode)} before it returned; "
                                      "run the same command with train.resume=true to continue from "
                                      "each run's last checkpoint")
        if pending and not any(proc.is_alive() for proc in self.procs):
            for key in sorted(pending):
                yield key, WorkerLost("no worker process was left to train this pack; run the same "
                                      "command with train.resume=true to train it")
            pending.clear()

    def stop(self, signum: int) -> None:
        """Forward a signal: packs in training checkpoint and return Interrupted, the rest Stopped."""
        self.stopping.value = signum
        for proc in self.procs:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    @contextmanager
    def forwarding_signals(self) -> Iterator[list[int]]:
        """SIGTERM and SIGINT forwarded to the workers the moment they come (a pack trains on until its
        worker hears), and listed in the block's value for the sweep's own end."""
        received: list[int] = []

        def forward(signum: int) -> None:
            received.append(signum)
            self.stop(signum)

        with handling_signals(forward):
            yield received

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def killed_by(exitcode: int) -> str:
    """` (killed by SIGKILL)` for a negative exit code, else nothing."""
    if exitcode < 0:
        try:
            return f" (killed by {signal.Signals(-exitcode).name})"
        except ValueError:
            return ""
    return ""
