"""A job's lifecycle, one for `gvae-train` and the packed launcher alike: lock its folder, decide
whether the run may use it (writing nothing), record it, train it (alone or in a pack), and finish
it, or fail with one message and failed.json.

    lock -> open_run (refuse | skip a finished run | accept) -> record -> train -> finish | fail

The library calls `train` (one run) and `train_runs` (runs that can share a pack) do the middle
of it without a lock, for scripts and tests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gvae import checkpoint as ckpt
from gvae.config import Config, container, validate
from gvae.engine import build_engine
from gvae.errors import GvaeError, NonFiniteError
from gvae.run_folder import (
    JobFailed,
    RunExists,
    RunFolder,
    clear_outputs,
    describe_failure,
    held_run,
    logging_to,
    write_failure,
)
from gvae.trainer import Run
from gvae.trainer import train as train_loop

log = logging.getLogger(__name__)


@dataclass
class OpenedRun:
    """What open_run decided about a run folder, before anything was written."""

    cfg: DictConfig  # as composed: its record and its logs
    config: Config  # typed and checked
    out_dir: Path
    checkpoint: dict | None  # the state to resume from
    finished: dict | None  # the metrics of a run already finished: nothing to do
    replaces: str | None = None  # the run in the folder that train.overwrite replaces, in words

    @property
    def step(self) -> int:
        return self.checkpoint["step"] if self.checkpoint else 0


def finished_metrics(out_dir: Path, max_steps: int) -> dict[str, Any] | None:
    """The metrics of a run in out_dir that completed max_steps, or None (a damaged metrics.json too:
    the run's figures are then made again from its checkpoint)."""
    path = out_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
        done = metrics.get("status") == "complete" and metrics["step"] >= max_steps
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        log.warning("%s cannot be read (%s): the run's figures are made again from its checkpoint", path, e)
        return None
    return metrics if done else None


def open_run(cfg: DictConfig, out_dir: Path) -> OpenedRun:
    """Whether this run may use out_dir, decided without writing anything: its config valid; with
    train.resume a checkpoint there of its own configuration (ConfigError, CheckpointError); without
    it no run there, unless train.overwrite replaces it (RunExists)."""
    typed = validate(cfg)
    opened = OpenedRun(cfg, typed, out_dir, None, None)
    if not typed.train.resume:
        if (held := held_run(out_dir)) is not None:
            if not typed.train.overwrite:
                raise RunExists(
                    f"{out_dir} already holds {held}: a new run there would overwrite it. To continue "
                    "it, run the same command with train.resume=true; to keep it, choose another folder "
                    "(hydra.run.dir, or hydra.sweep.dir for a sweep); to replace it, add "
                    "train.overwrite=true.")
            opened.replaces = held
        return opened
    path = out_dir / "checkpoints" / "last.pt"
    if path.exists():
        opened.checkpoint = ckpt.load_checkpoint(path)
        ckpt.check_compatible(path, opened.checkpoint["config"], container(cfg))
    if (done := finished_metrics(out_dir, typed.train.max_steps)) is not None:
        log.info("%s already finished %d steps (train.resume=true): nothing to do", out_dir, done["step"])
        opened.finished = done
    elif opened.checkpoint is None:
        log.info("train.resume=true but no checkpoint in %s: starting from step 0", path.parent)
    return opened


def replace_outputs(opened: OpenedRun) -> None:
    """Delete what the run replaced by train.overwrite wrote (the folder is the new run's)."""
    if opened.replaces is not None:
        log.warning("%s: replacing %s (train.overwrite=true)", opened.out_dir, opened.replaces)
        clear_outputs(opened.out_dir)


def command_line_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the command line set for this run ({key or config group: value}), for the hparams view:
    in a multirun, the swept keys are among them. Empty outside Hydra."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    settings: dict[str, Any] = {}
    for override in hydra_cfg.overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key == "train.resume":
            continue
        if key in hydra_cfg.runtime.choices:  # a config group: its option's name
            settings[key] = hydra_cfg.runtime.choices[key]
        elif (value := OmegaConf.select(cfg, key)) is not None:
            settings[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return settings


def record_divergence(run: Run, error: NonFiniteError) -> None:
    """A run that diverged: its message, and failed.json (its pack-mates train on)."""
    log.error("%s%s", run.label, error)
    write_failure(run.out_dir, "failed", str(error), error)


def train_opened(opened: list[OpenedRun], settings: list[dict[str, Any]],
                 on_failure=record_divergence) -> list[dict[str, Any] | NonFiniteError]:
    """Train the opened runs that are not finished, together (gvae/engine.py: alone, or a pack).
    Returns each run's metrics (a finished run's, as found), or the NonFiniteError of a run that
    diverged. An interrupt checkpoints every run and raises."""
    results: list[dict[str, Any] | NonFiniteError | None] = [o.finished for o in opened]
    todo = [i for i, o in enumerate(opened) if o.finished is None]
    if not todo:
        return results
    # Built before a folder is made: runs that cannot share a pack are refused with nothing written.
    engine = build_engine([opened[i].config for i in todo], [opened[i].checkpoint for i in todo])
    for i in todo:
        opened[i].out_dir.mkdir(parents=True, exist_ok=True)
    runs = [Run(opened[i].config, container(opened[i].cfg), opened[i].out_dir, parts, opened[i].checkpoint,
                settings[i], label=f"{opened[i].out_dir.name}: " if len(todo) > 1 else "")
            for i, parts in zip(todo, engine.runs, strict=True)]
    for i, result in zip(todo, train_loop(engine, runs, on_failure), strict=True):
        results[i] = result
    return results


def train_runs(cfgs: list[DictConfig], out_dirs: list[Path],
               settings: list[dict[str, Any]] | None = None) -> list[dict[str, Any] | NonFiniteError]:
    """Train runs that can share a pack together (one alone), each writing what a separate run writes
    in its own folder, with no lock: the library's call. `settings`: what each run's command line
    set, for its hparams record (default: Hydra's, when Hydra runs)."""
    opened = [open_run(c, d) for c, d in zip(cfgs, out_dirs, strict=True)]  # before anything is written
    for o in opened:
        replace_outputs(o)
    return train_opened(opened, settings or [command_line_settings(c) for c in cfgs])


def train(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Train per `cfg`, writing TensorBoard events, checkpoints and metrics.json under out_dir."""
    (result,) = train_runs([cfg], [out_dir])
    if isinstance(result, GvaeError):
        raise result
    return result


# -----------------------------------------------------------------------------
# the lifecycle of a job's folder


class Job:
    """One run folder from its lock to its end. `hydra_cfg`: the `hydra` node written beside the run's
    config; `log_name`: its log file's name (Hydra's job name); `label`: how shared log lines name it."""

    def __init__(self, out_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig | None, log_name: str,
                 settings: dict[str, Any], job_num: int | None = None, label: str = ""):
        self.folder = RunFolder(out_dir)
        self.cfg, self.hydra_cfg, self.log_name, self.settings = cfg, hydra_cfg, log_name, settings
        self.job_num, self.label = job_num, label
        self.opened: OpenedRun | None = None
        self.recorded_failure: BaseException | None = None

    @property
    def out_dir(self) -> Path:
        return self.folder.path

    def accept(self, stack: ExitStack) -> bool:
        """Lock the folder for as long as `stack` lasts (FolderBusy), then decide, writing nothing,
        whether the run may use it (GvaeError when refused). A run finished before: False, and
        nothing written. Otherwise the run is recorded (.hydra/) and True."""
        stack.enter_context(self.folder)
        self.opened = open_run(self.cfg, self.out_dir)
        if self.opened.finished is not None:
            return False
        replace_outputs(self.opened)
        self.folder.record(self.cfg, self.hydra_cfg)
        return True

    @contextmanager
    def logging(self) -> Iterator[None]:
        """The log also goes to the job's own log file in the block."""
        with logging_to(self.out_dir / f"{self.log_name}.log"):
            yield

    def diverged(self, error: NonFiniteError) -> None:
        """Its run diverged during training (the others of its pack train on)."""
        self.recorded_failure = error
        log.error("%s%s", self.label, error)
        write_failure(self.out_dir, "failed", str(error), error)

    def completed(self, metrics: dict[str, Any]) -> float:
        """A finished run: what it returns to a sweeper, the best validation figure (never a test one)."""
        (self.out_dir / "failed.json").unlink(missing_ok=True)  # a resumed run that failed before
        return metrics["val_nelbo_best"]

    def failed(self, error: BaseException) -> tuple[str, str, int]:
        """One message, failed.json if the run owns its folder; (status, message, exit status)."""
        status, message, code = describe_failure(error, self.out_dir)
        if error is self.recorded_failure:
            return status, message, code
        if self.folder.recorded:
            log.error("%s%s", self.label, message)
            write_failure(self.out_dir, status, message, error)
        else:
            if self.out_dir.is_dir() and any(self.out_dir.iterdir()):  # (an empty one is removed)
                message += f" (refused: {self.out_dir} is left as it was)"
            log.error("%s%s", self.label, message)
        return status, message, code

    def job_failed(self, message: str) -> JobFailed:
        """Hydra's record of a failed multirun job, as one line."""
        return JobFailed(f"job {self.job_num} ({self.out_dir}) failed: {message}")

    def end(self, error: BaseException) -> NoReturn:
        """gvae-train's end after a failure: in a multirun, Hydra's record of a failed job (the other
        jobs go on; an interrupt stops the sweep), else the exit status."""
        status, message, code = self.failed(error)
        if self.job_num is not None and status != "interrupted":
            raise self.job_failed(message) from None
        raise SystemExit(code) from None


def train_jobs(jobs: list[Job]) -> list[dict[str, Any] | NonFiniteError]:
    """Train accepted jobs together (one pack, or one run); a diverging job is recorded as it
    diverges. The caller sends the log to the jobs' log files (Job.logging)."""
    by_dir = {job.out_dir: job for job in jobs}
    return train_opened([job.opened for job in jobs], [job.settings for job in jobs],
                        on_failure=lambda run, error: by_dir[run.out_dir].diverged(error))
