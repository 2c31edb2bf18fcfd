"""Train a discrete-latent VAE: `gvae-train [overrides]`, `gvae-train -m ...` for sweeps.

The config is checked and turned into typed objects once (config.validate); the loop below reads
plain attributes and locals only. Everything per step stays on the device; the host reads the
accumulated figures once per log interval, and checks then that they are finite. SIGTERM and
SIGINT save a checkpoint and stop; `train.resume=true` continues a run or a sweep
(docs/robustness.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gvae import checkpoint as ckpt
from gvae.config import (
    Config,
    config_path,
    container,
    flatten,
    import_extensions,
    register_configs,
    resolve_device,
    validate,
)
from gvae.data import BatchSampler, Splits, load_splits
from gvae.diagnostics import diagnose
from gvae.errors import GvaeError, Interrupted, JobFailed, NonFiniteError, Stopped
from gvae.estimators import Estimator, build_estimator
from gvae.evaluation import eval_generator, evaluate, split_nelbo
from gvae.files import write_json
from gvae.model import VAE
from gvae.objective import TrainStats
from gvae.packing import PackedTraining, check_packable, pack_trainings
from gvae.rng import CounterRNG
from gvae.run_folder import FolderBusy, RunFolder, describe_failure, signals_raise_stopped, write_failure
from gvae.step import StepFn, make_train_step, optimizer_kwargs, resolve_mode
from gvae.summaries import log_config_and_hparams, log_images, log_layout

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# building


@dataclass
class Training:
    """Everything the training loop needs for one run, built from the config."""

    device: torch.device
    splits: Splits
    sampler: BatchSampler
    model: VAE
    estimator: Estimator
    optimizer: torch.optim.Optimizer
    mode: str
    step: StepFn | None  # None when the run is built to be packed (gvae/packing.py)
    tau: torch.Tensor  # a device tensor, so a compiled step never recompiles when tau changes

    def train_step(self) -> TrainStats:
        return self.step(self.sampler.next(), self.tau)

    def set_tau(self, values: list[float]) -> None:
        self.tau.fill_(values[0])

    def lr(self, s: int) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def sync_to_runs(self) -> None:
        """A single run trains its own modules: nothing to copy."""


def build_training(cfg: Config | DictConfig, saved: dict | None = None, splits: Splits | None = None,
                   make_step: bool = True) -> Training:
    """Seed, load the data onto the device (or share `splits`), build the model, estimator,
    optimizer and step, and restore the checkpoint `saved` (before the step is made: a captured
    graph keeps its tensors' addresses). Without make_step, the run is built to be packed."""
    if isinstance(cfg, DictConfig):
        cfg = validate(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    torch.manual_seed(cfg.seed)
    splits = splits if splits is not None else load_splits(cfg.data, device)
    sampler = BatchSampler(splits.train, cfg.train.batch_size, seed=cfg.seed)
    model = VAE(cfg.model, cfg.data.image_shape).to(device)
    estimator = build_estimator(cfg.estimator, model.latent).to(device)
    params = [*model.parameters(), *estimator.parameters()]
    mode = resolve_mode(cfg.train.compile, device)
    optimizer_cls = hydra.utils.get_class(cfg.optim._target_)
    optimizer = hydra.utils.instantiate(cfg.optim)(params, **optimizer_kwargs(optimizer_cls, mode))
    step = saved["step"] if saved else 0
    if saved:
        ckpt.restore(saved, model, estimator, optimizer, sampler, device)
    tau = torch.tensor(cfg.schedule.temperature(step), device=device)
    if not make_step:
        return Training(device, splits, sampler, model, estimator, optimizer, mode.value, None, tau)
    # Training noise is a function of the seed and the step alone (gvae/rng.py).
    rng = CounterRNG(cfg.seed, device, step)
    model.latent.rng = splits.rng = rng
    train_step = make_train_step(model, estimator, optimizer, splits, cfg.train.precision, mode,
                                 cfg.train.batch_size, rng)
    return Training(device, splits, sampler, model, estimator, optimizer, mode.value, train_step, tau)


# -----------------------------------------------------------------------------
# helpers


def all_finite(*tensors: torch.Tensor) -> bool:
    """One host read: are all these tensors finite?"""
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


def finished_metrics(out_dir: Path, max_steps: int) -> dict[str, Any] | None:
    """The metrics of a run in out_dir that completed max_steps, or None."""
    path = out_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("status") == "complete" and metrics["step"] >= max_steps else None


@contextmanager
def deferred_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """Inside the block SIGTERM and SIGINT only append to the yielded list, which the loop reads
    after each step (a Python list: no device sync) to checkpoint and stop; the previous handlers
    come back afterwards. Only the main thread may set handlers, so elsewhere signals act as usual."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signums}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def tensorboard_dir(out_dir: Path) -> Path:
    """The folder to point TensorBoard at: a sweep's (it holds multirun.yaml), so its jobs sit side
    by side, or the run's."""
    return out_dir.parent if (out_dir.parent / "multirun.yaml").is_file() else out_dir


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


# -----------------------------------------------------------------------------
# training


@dataclass
class Run:
    """One run's own record in the loop: where it writes and what it has seen."""

    cfg: Config
    config: dict[str, Any]  # plain values, for the checkpoint and the logs
    out_dir: Path
    training: Training  # its separate modules (in a pack, copies of its slice)
    saved: dict | None
    writer: SummaryWriter | None = None
    best_val: float = float("inf")
    val_curve: list[list[float]] = dataclasses.field(default_factory=list)
    last_val: float = float("nan")
    ckpt_step: int | None = None  # the step of the last good checkpoint
    finite_at: int = 0  # the last step at which its tensors were seen finite
    tau_now: float = 1.0
    wall_before: float = 0.0  # seconds spent on this run by the processes before this one (resumed)
    failure: NonFiniteError | None = None
    settings: dict[str, Any] | None = None  # for the hparams record; None: Hydra's command line

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    def non_finite(self, what: str) -> NonFiniteError:
        kept = (f"the last good checkpoint, {self.ckpt_path} (step {self.ckpt_step}), is kept"
                if self.ckpt_step is not None else "no checkpoint had been written")
        return NonFiniteError(f"{what}; {kept}. Lower optim.lr or change the estimator's settings.")


def resume_state(cfg: Config, config: dict[str, Any], out_dir: Path) -> tuple[dict | None, dict | None]:
    """(the checkpoint to resume from, the metrics of a run already finished), per train.resume."""
    path = out_dir / "checkpoints" / "last.pt"
    if not cfg.train.resume:
        return None, None
    saved = None
    if path.exists():
        saved = ckpt.load_checkpoint(path)
        ckpt.check_compatible(path, saved["config"], config)
    if (done := finished_metrics(out_dir, cfg.train.max_steps)) is not None:
        log.info("%s already finished %d steps (train.resume=true): nothing to do", out_dir, done["step"])
        return saved, done
    if saved is None:
        log.info("train.resume=true but no checkpoint in %s: starting from step 0", path.parent)
    return saved, None


Opened = tuple[Config, dict | None, dict | None]  # (typed config, checkpoint to resume, finished metrics)


def open_run(cfg: DictConfig, out_dir: Path) -> Opened:
    """Whether this run may use out_dir, decided without writing anything: its config valid, and with
    train.resume a checkpoint there of its own configuration (ConfigError, CheckpointError)."""
    typed = validate(cfg)
    saved, done = resume_state(typed, container(cfg), out_dir)
    return typed, saved, done


def train(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Train per `cfg`, writing TensorBoard events, checkpoints and metrics.json under out_dir."""
    (result,) = train_runs([cfg], [out_dir])
    if isinstance(result, GvaeError):
        raise result
    return result


def train_runs(cfgs: list[DictConfig], out_dirs: list[Path], settings: list[dict[str, Any]] | None = None,
               opened: list[Opened] | None = None) -> list[dict[str, Any] | NonFiniteError]:
    """Train runs that can share a pack (gvae/packing.py) together, one alone, each writing what a
    separate run writes in its own folder. Returns each run's metrics, or the NonFiniteError of a
    run that diverged (its pack-mates go on). An interrupt checkpoints every run and raises.
    `settings`: what each run's command line set, for its hparams record (default: Hydra's);
    `opened`: each run's open_run, when the caller has decided already."""
    if opened is None:
        opened = [open_run(c, d) for c, d in zip(cfgs, out_dirs, strict=True)]  # before anything is written
    typed = [t for t, _, _ in opened]
    if len(typed) > 1:
        check_packable(typed)
    configs = [container(c) for c in cfgs]
    states = [(saved, done) for _, saved, done in opened]
    results: list[dict | NonFiniteError | None] = [done for _, done in states]
    todo = [i for i, done in enumerate(results) if done is None]
    if not todo:
        return results
    steps = [states[i][0]["step"] if states[i][0] else 0 for i in todo]
    if len(set(steps)) > 1:
        raise ValueError(f"runs at steps {sorted(set(steps))} cannot train in one pack")
    for i in todo:
        out_dirs[i].mkdir(parents=True, exist_ok=True)
    splits = None
    runs = []
    for i in todo:
        training = build_training(typed[i], states[i][0], splits=splits, make_step=len(todo) == 1)
        splits = training.splits
        runs.append(Run(typed[i], configs[i], out_dirs[i], training, states[i][0],
                        settings=settings[i] if settings is not None else None))
    engine = runs[0].training if len(runs) == 1 else pack_trainings([r.cfg for r in runs],
                                                                     [r.training for r in runs], steps)
    metrics = _loop(engine, runs, steps[0])
    for i, result in zip(todo, metrics, strict=True):
        results[i] = result
    return results


def _loop(engine: Training | PackedTraining, runs: list[Run], step: int) -> list[dict | NonFiniteError]:
    """The training loop over one run, or a pack of runs stepping together."""
    first = runs[0].cfg
    device, splits = engine.device, engine.splits
    evaluation, diag = first.eval, first.diag
    max_steps, log_every = first.train.max_steps, first.train.log_every
    eval_every, ckpt_every = first.train.eval_every, first.train.ckpt_every
    packed = len(runs) > 1
    for run in runs:
        if run.saved:
            run.best_val, run.ckpt_step = run.saved["val_nelbo_best"], run.saved["step"]
            # [step, validation nelbo] at each evaluation: the curve of the paper's Figure 4, kept in
            # the checkpoint so that a resumed run reports all of it (older checkpoints have none).
            run.val_curve = [list(p) for p in run.saved.get("val_curve", [])]
            run.wall_before = float(run.saved.get("wall_seconds", 0.0))
            log.info("resumed from %s at step %d", run.ckpt_path, step)
        run.finite_at = step
        run.tau_now = run.cfg.schedule.temperature(step)
        # Resuming: the same folder, where the events logged after the checkpoint (before a crash)
        # are hidden, since this run logs those steps again.
        run.writer = SummaryWriter(str(run.out_dir), purge_step=step + 1 if run.saved else None)
        log_layout(run.writer)
    # What a divergence corrupts: parameters, and estimator baselines (buffers).
    watched = [*engine.model.parameters(), *engine.estimator.parameters(), *engine.estimator.buffers()]
    if packed:  # per run: the tensors with a run dimension
        watched = [t for t in watched if t.dim() > 0 and t.shape[0] == len(runs)]
    tau_changes_at = min(run.cfg.schedule.next_change(step) for run in runs)
    active = lambda: [run for run in runs if run.failure is None]  # noqa: E731

    def check_finite() -> None:
        """One host read: which runs' figures since the last log and tensors are still finite.
        A single run raises; a packed run that diverged is stopped and recorded, its mates go on."""
        if packed:
            ok = torch.stack([running.values.isfinite().all(0)]
                             + [t.reshape(len(runs), -1).isfinite().all(1) for t in watched]).all(0).tolist()
        else:
            ok = [all_finite(running.values, *watched)]
        for run, fine in zip(runs, ok, strict=True):
            if run.failure is None and not fine:
                run.failure = run.non_finite(f"non-finite loss or parameters between steps {run.finite_at} "
                                             f"and {step}")
                if not packed:
                    raise run.failure
                log.error("%s: %s", run.out_dir, run.failure)
                write_json(run.out_dir / "failed.json", {"status": "failed",
                                                          "error": f"NonFiniteError: {run.failure}"})
            elif fine:
                run.finite_at = step

    def checkpoint() -> None:
        check_finite()  # never replace a good checkpoint with a diverged run
        engine.sync_to_runs()
        for run in active():
            t = run.training
            run.ckpt_path.parent.mkdir(exist_ok=True)
            state = ckpt.state(t.model, t.estimator, t.optimizer, t.sampler, device, step, run.best_val,
                               run.val_curve, run.config, run.wall_before + time.perf_counter() - t_start)
            ckpt.save_checkpoint(run.ckpt_path, state)
            run.ckpt_step = step

    def evaluate_val() -> None:
        engine.sync_to_runs()
        for run in active():
            model = run.training.model
            run.last_val = split_nelbo(model, splits, "val", evaluation)
            if not math.isfinite(run.last_val):
                run.failure = run.non_finite(f"the validation nelbo is {run.last_val} at step {step}")
                if not packed:
                    raise run.failure
                write_json(run.out_dir / "failed.json", {"status": "failed",
                                                          "error": f"NonFiniteError: {run.failure}"})
                continue
            if evaluation.images:
                model.eval()
                images = splits.eval_targets(splits.val[:32])
                log_images(run.writer, model, images, step, eval_generator(device))
                model.train()
            run.best_val = min(run.best_val, run.last_val)
            run.val_curve.append([step, run.last_val])
            run.writer.add_scalar("val/nelbo", run.last_val, step)
            run.writer.flush()
            prefix = f"{run.out_dir.name}: " if packed else ""
            log.info("%sstep %d  val nelbo %.3f", prefix, step, run.last_val)

    log.info("device %s, step mode %s, %d parameters, %s", device, engine.mode,
             sum(p.numel() for p in runs[0].training.model.parameters()),
             f"{len(runs)} runs packed, outputs {', '.join(str(r.out_dir) for r in runs)}" if packed
             else f"output {runs[0].out_dir}")
    running = TrainStats.zeros(device, len(runs) if packed else None)  # sums since the last log
    # The training -ELBO averaged over the last epoch (the ReinMax benchmark's metric).
    last_epoch = TrainStats.zeros(device, len(runs) if packed else None)
    last_epoch_from = max_steps - runs[0].training.sampler.batches_per_epoch
    first_step, since_log = step, 0
    train_seconds, steps_this_run = 0.0, 0
    t_start = t_log = time.perf_counter()
    bar = tqdm(total=max_steps, initial=step, disable=None, dynamic_ncols=True, unit="step")
    try:
        with logging_redirect_tqdm(), deferred_signals() as received:
            while step < max_steps:
                if step >= tau_changes_at:  # the schedules move only every few steps
                    for run in runs:
                        run.tau_now = run.cfg.schedule.temperature(step)
                    engine.set_tau([run.tau_now for run in runs])  # a device write, no sync
                    tau_changes_at = min(run.cfg.schedule.next_change(step) for run in runs)
                stats = engine.train_step()
                running.add_(stats)
                if step >= last_epoch_from:
                    last_epoch.add_(stats)
                step += 1
                since_log += 1

                if step % log_every == 0 or step == max_steps:
                    means = running.means(since_log)  # the one sync per interval
                    now = time.perf_counter()
                    train_seconds += now - t_log
                    steps_this_run += since_log
                    check_finite()
                    per_run = {k: v if packed else [v] for k, v in means.items()}
                    for s, run in enumerate(runs):
                        if run.failure is not None:
                            continue
                        # train/loss is the negative ELBO at the training sample (its name since the
                        # start); train/surrogate the loss the optimizer minimises.
                        scalars = {"train/loss": per_run["nelbo"][s],
                                   "train/surrogate": per_run["surrogate"][s],
                                   "train/recon": per_run["recon"][s], "train/kl": per_run["kl"][s],
                                   "train/tau": run.tau_now, "train/lr": engine.lr(s),
                                   "perf/steps_per_sec": since_log / (now - t_log)}
                        for tag, value in scalars.items():
                            run.writer.add_scalar(tag, value, step)
                    if not active():
                        break
                    bar.set_postfix(loss=f"{per_run['nelbo'][0]:.2f}", tau=f"{runs[0].tau_now:.3f}",
                                    val=f"{runs[0].last_val:.2f}")
                    bar.update(since_log)
                    running.values.zero_()
                    since_log = 0
                    t_log = time.perf_counter()

                if step % eval_every == 0 or step == max_steps:
                    evaluate_val()
                    t_log = time.perf_counter()

                if diag.every and step % diag.every == 0:
                    engine.sync_to_runs()
                    batch = splits.eval_targets(splits.val[: diag.batch])
                    for run in active():
                        tau = run.tau_now if packed else engine.tau
                        for name, value in diagnose(run.training.model, run.training.estimator, batch, tau,
                                                    diag).items():
                            run.writer.add_scalar(f"grad/{name}", value, step)
                    t_log = time.perf_counter()

                if step % ckpt_every == 0 or step == max_steps or received:
                    checkpoint()
                    t_log = time.perf_counter()
                if received:
                    name = signal.Signals(received[0]).name
                    log.warning("%s: stopped at step %d, checkpoints %s", name, step,
                                ", ".join(str(r.ckpt_path) for r in active()))
                    saved = "each run's checkpoint" if packed else str(runs[0].ckpt_path)
                    raise Interrupted(f"{name} at step {step}: saved {saved}; run the same command with "
                                      "train.resume=true to continue", received[0])

        results: list[dict | NonFiniteError] = []
        engine.sync_to_runs()
        epoch_steps = min(max_steps, runs[0].training.sampler.batches_per_epoch)
        epoch_means = last_epoch.means(epoch_steps)["nelbo"]
        epoch_means = epoch_means if packed else [epoch_means]
        for s, run in enumerate(runs):
            if run.failure is not None:
                results.append(run.failure)
                continue
            results.append(_finish(run, splits, device, step, engine.mode,
                                   steps_this_run / train_seconds if train_seconds else float("nan"),
                                   time.perf_counter() - t_start,
                                   epoch_means[s] if first_step <= last_epoch_from else None))
        return results
    finally:
        bar.close()
        for run in runs:
            if run.writer is not None:
                run.writer.close()


def _finish(run: Run, splits: Splits, device: torch.device, step: int, mode: str, steps_per_sec: float,
            wall_seconds: float, train_nelbo_last_epoch: float | None) -> dict[str, Any]:
    """A run's final evaluation, metrics.json, hparams record and summary line."""
    model, evaluation = run.training.model, run.cfg.eval
    if not run.val_curve or run.val_curve[-1][0] != step:  # resumed from a checkpoint taken at the end
        run.val_curve.append([step, split_nelbo(model, splits, "val", evaluation)])
    last_val = run.val_curve[-1][1]
    test = evaluate(model, splits, evaluation, ("test",), bound=True, progress=True)
    test_nelbo, test_bound = test["test_nelbo"], test["test_bound"]
    run.writer.add_scalar("test/nelbo", test_nelbo, step)
    run.writer.add_scalar("test/bound", test_bound, step)
    metrics = {
        "status": "complete", "step": step, "val_nelbo": last_val, "val_nelbo_best": run.best_val,
        "test_nelbo": test_nelbo, "test_bound": test_bound, "num_samples": evaluation.num_samples,
        # steps_per_sec: this process's training rate; wall_seconds: the whole run's, every process
        # that trained it (up to its last checkpoint) included.
        "steps_per_sec": steps_per_sec, "wall_seconds": run.wall_before + wall_seconds, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "step_mode": mode, "val_curve": run.val_curve,
        # What the figures belong to, so that a table can check the folder's config still says so.
        "run_config": ckpt.run_defining(flatten(run.config)),
    }
    if train_nelbo_last_epoch is not None:  # not when a resume split the last epoch
        metrics["train_nelbo_last_epoch"] = train_nelbo_last_epoch
    cfg = OmegaConf.create(run.config)
    settings = run.settings if run.settings is not None else command_line_settings(cfg)
    log_config_and_hparams(run.writer, cfg, {
        "val_nelbo": last_val, "val_nelbo_best": run.best_val, "test_nelbo": test_nelbo,
        "test_bound": test_bound}, settings)
    write_json(run.out_dir / "metrics.json", metrics)
    log.info("done in %.0f s: val -ELBO %.2f (best %.2f), test -ELBO %.2f, test bound (m=%d) %.2f; "
             "run folder %s; to inspect: tensorboard --logdir %s", metrics["wall_seconds"], last_val,
             run.best_val, test_nelbo, evaluation.num_samples, test_bound, run.out_dir,
             tensorboard_dir(run.out_dir))
    return metrics


# -----------------------------------------------------------------------------
# entry point


def register_plugins() -> None:
    """gvae's Hydra plugins (hydra_plugins/gvae_plugins). Hydra finds plugins by listing the
    hydra_plugins namespace, which an editable install does not let it list: register them here."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.gvae_plugins.packed_launcher import PackedLauncher
    from hydra_plugins.gvae_plugins.rows_sweeper import RowsSweeper

    Plugins.instance().register(RowsSweeper)
    Plugins.instance().register(PackedLauncher)


import_extensions()
register_configs()
register_plugins()


@hydra.main(version_base="1.3", config_path=config_path(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: train in Hydra's output folder; return the best validation negative
    ELBO, the figure a sweeper (Optuna, Ax) minimises: selection never sees the test set.

    The folder is locked for the run's lifetime and written only once the run is accepted
    (gvae/run_folder.py); every failure ends in one message, a non-zero status and, once the run
    owns the folder, failed.json."""
    hydra_cfg = HydraConfig.get()
    folder = RunFolder(Path(hydra_cfg.runtime.output_dir))
    job_num = hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        with signals_raise_stopped(), folder:
            try:
                return run_in(folder, cfg, hydra_cfg)
            except (GvaeError, OSError, Stopped, KeyboardInterrupt) as e:
                end_run(folder, e, job_num)  # logged while train.log is open
    except FolderBusy as e:
        end_run(folder, e, job_num)


def run_in(folder: RunFolder, cfg: DictConfig, hydra_cfg: DictConfig) -> float:
    """The run in its locked folder: refused (nothing written), skipped (already finished: nothing
    written), or recorded and trained."""
    typed, saved, done = open_run(cfg, folder.path)
    if done is not None:  # nothing in its folder changes
        return done["val_nelbo_best"]
    folder.record(cfg, hydra_cfg, hydra_cfg.job.name)
    (result,) = train_runs([cfg], [folder.path], opened=[(typed, saved, done)])
    if isinstance(result, GvaeError):
        raise result
    (folder.path / "failed.json").unlink(missing_ok=True)  # a resumed run that failed before has now finished
    return result["val_nelbo_best"]


def end_run(folder: RunFolder, error: BaseException, job_num: int | None) -> NoReturn:
    """One message, failed.json if the run owns its folder, then the exit: a non-zero status, or in a
    multirun Hydra's record of a failed job (the other jobs go on; an interrupt stops the sweep)."""
    status, message, code = describe_failure(error, folder.path)
    if folder.recorded:
        log.error("%s", message)
        write_failure(folder.path, status, message, error)
    else:
        if folder.path.is_dir() and any(folder.path.iterdir()):  # (an empty one is removed)
            message += f" (refused: {folder.path} is left as it was)"
        log.error("%s", message)
    if job_num is not None and status != "interrupted":
        raise JobFailed(f"job {job_num} ({folder.path}) failed: {message}") from None
    raise SystemExit(code) from None


if __name__ == "__main__":
    main()
