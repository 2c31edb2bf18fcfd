"""The training loop, top to bottom: S >= 1 runs stepping together in one engine (gvae/engine.py),
each writing what a run writes in its own folder (TensorBoard events, checkpoints, metrics.json).

The config was checked and turned into typed objects once (config.validate); the loop reads plain
attributes and locals only. Everything per step stays on the device; the host reads the accumulated
figures once per log interval, and checks then that each run's figures and tensors are finite. A run
that diverges is stopped and recorded as failed, the others go on. SIGTERM and SIGINT save every
run's checkpoint and stop; `train.resume=true` continues (docs/robustness.md). Nothing here knows
Hydra, or how many runs share the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gvae import checkpoint as ckpt
from gvae.config import Config
from gvae.diagnostics import diagnose
from gvae.engine import Engine, RunParts
from gvae.errors import Interrupted, NonFiniteError
from gvae.evaluation import eval_generator, evaluate, split_nelbo
from gvae.files import write_json
from gvae.objective import TrainStats
from gvae.run_folder import handling_signals
from gvae.summaries import log_config_and_hparams, log_layout

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One run's own record in the loop: where it writes and what it has seen."""

    cfg: Config
    config: dict[str, Any]  # plain values, for the checkpoint and the logs
    out_dir: Path
    parts: RunParts  # its own modules (in a pack, what sync_to_runs copies its slice into)
    saved: dict | None  # the checkpoint it resumes from
    settings: dict[str, Any]  # what its command line set, for the hparams record
    label: str = ""  # how shared log lines name it ("" when it trains alone)
    writer: SummaryWriter | None = None
    best_val: float = float("inf")
    val_curve: list[list[float]] = dataclasses.field(default_factory=list)
    last_val: float = float("nan")
    ckpt_step: int | None = None  # the step of the last good checkpoint
    ckpt_digest: str | None = None  # its checksum: the identity of the state its figures come from
    finite_at: int = 0  # the last step at which its tensors were seen finite
    tau_now: float = 1.0
    wall_before: float = 0.0  # seconds spent on this run by the processes before this one (resumed)
    failure: NonFiniteError | None = None

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    def non_finite(self, what: str) -> NonFiniteError:
        kept = (f"the last good checkpoint, {self.ckpt_path} (step {self.ckpt_step}), is kept"
                if self.ckpt_step is not None else "no checkpoint had been written")
        return NonFiniteError(f"{what}; {kept}. Lower optim.lr or change the estimator's settings.")


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Inside the block SIGTERM and SIGINT only append to the yielded list, which the loop reads
    after each step (a Python list: no device sync) to checkpoint and stop."""
    received: list[int] = []
    with handling_signals(received.append):
        yield received


def tensorboard_dir(out_dir: Path) -> Path:
    """The folder to point TensorBoard at: a sweep's (it holds multirun.yaml), so its jobs sit side
    by side, or the run's."""
    return out_dir.parent if (out_dir.parent / "multirun.yaml").is_file() else out_dir


def saved_where(runs: list[Run]) -> str:
    return str(runs[0].ckpt_path) if len(runs) == 1 else "each run's checkpoint"


def train(engine: Engine, runs: list[Run], on_failure: Callable[[Run, NonFiniteError], None]
          ) -> list[dict[str, Any] | NonFiniteError]:
    """Train the engine's runs to train.max_steps (their shared cadences: runs[0]'s); return each
    run's metrics, or the NonFiniteError of a run that diverged, which is also handed to
    `on_failure` when it is found (the others train on)."""
    first = runs[0].cfg
    device, splits = engine.device, engine.splits
    evaluation, diag = first.eval, first.diag
    max_steps, log_every = first.train.max_steps, first.train.log_every
    eval_every, ckpt_every = first.train.eval_every, first.train.ckpt_every
    step = runs[0].saved["step"] if runs[0].saved else 0
    task = runs[0].parts.model
    for run in runs:
        if run.saved:
            run.best_val, run.ckpt_step = run.saved["val_nelbo_best"], run.saved["step"]
            run.ckpt_digest = run.saved.get("sha256")
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
        log_layout(run.writer, task.train_tags)
    # What a divergence corrupts, per run: parameters, and estimator baselines (buffers).
    watched = engine.watched()
    tau_changes_at = min(run.cfg.schedule.next_change(step) for run in runs)
    failed = 0  # runs stopped by a divergence

    def fail(run: Run, error: NonFiniteError) -> None:
        nonlocal failed
        run.failure, failed = error, failed + 1
        on_failure(run, error)

    def check_finite() -> None:
        """One host read: which runs' figures since the last log and tensors are still finite."""
        ok = torch.stack([running.values.isfinite().all(0)]
                         + [t.reshape(len(runs), -1).isfinite().all(1) for t in watched]).all(0).tolist()
        for run, fine in zip(runs, ok, strict=True):
            if run.failure is None and not fine:
                fail(run, run.non_finite(f"non-finite loss or parameters between steps {run.finite_at} "
                                         f"and {step}"))
            elif fine:
                run.finite_at = step

    def active() -> list[Run]:
        return [run for run in runs if run.failure is None]

    def checkpoint() -> None:
        check_finite()  # never replace a good checkpoint with a diverged run
        engine.sync_to_runs()
        for s, run in enumerate(runs):
            if run.failure is not None:
                continue
            p = run.parts
            run.ckpt_path.parent.mkdir(exist_ok=True)
            sums = None if running is None else {
                "names": list(running.names), "running": running.values[:, s].cpu(), "since_log": since_log,
                "last_epoch": last_epoch.values[:, s].cpu(), "epoch_seen": epoch_seen}
            wall = run.wall_before + time.perf_counter() - t_start
            state = ckpt.state(p.model, p.estimator, p.optimizer, p.sampler, device, step, run.best_val,
                               run.val_curve, run.config, wall, sums)
            run.ckpt_digest = ckpt.save_checkpoint(run.ckpt_path, state)
            run.ckpt_step = step

    def evaluate_val() -> None:
        engine.sync_to_runs()
        for run in active():
            model = run.parts.model
            run.last_val = split_nelbo(model, splits, "val", evaluation)
            if not math.isfinite(run.last_val):
                fail(run, run.non_finite(f"the validation nelbo is {run.last_val} at step {step}"))
                continue
            if evaluation.images:
                model.eval()
                model.log_images(run.writer, splits.eval_targets(splits.val[:32]), step,
                                 eval_generator(device))
                model.train()
            run.best_val = min(run.best_val, run.last_val)
            run.val_curve.append([step, run.last_val])
            run.writer.add_scalar("val/nelbo", run.last_val, step)
            run.writer.flush()
            log.info("%sstep %d  val nelbo %.3f", run.label, step, run.last_val)

    log.info("device %s, step mode %s, %d parameters, %s %s", device, engine.mode,
             sum(p.numel() for p in task.parameters()), engine.describe(),
             ", ".join(str(r.out_dir) for r in runs))
    # The training figures summed since the last log, and over the last epoch (its -ELBO's mean is the
    # ReinMax benchmark's metric); made at the first step, or restored from the checkpoints, so that a
    # resumed run logs and reports what a straight run does.
    running: TrainStats | None = None
    last_epoch: TrainStats | None = None
    last_epoch_from = max_steps - runs[0].parts.sampler.batches_per_epoch
    since_log = epoch_seen = 0  # steps in those sums
    sums = [run.saved.get("train_sums") if run.saved else None for run in runs]
    if all(sums):  # (a checkpoint before 2026-12-07 has none: its last epoch's mean is then not reported)
        names = tuple(sums[0]["names"])

        def restored(part: str) -> TrainStats:
            return TrainStats(names, torch.stack([torch.as_tensor(x[part]) for x in sums], 1).to(device))

        running, last_epoch = restored("running"), restored("last_epoch")
        since_log, epoch_seen = sums[0]["since_log"], sums[0]["epoch_seen"]
    here = 0  # steps of this process since the last log: its speed
    train_seconds, steps_this_run = 0.0, 0
    t_start = t_log = time.perf_counter()
    bar = tqdm(total=max_steps, initial=step, disable=None, dynamic_ncols=True, unit="step")
    try:
        with logging_redirect_tqdm(), deferred_signals() as received:
            while step < max_steps and failed < len(runs):
                if step >= tau_changes_at:  # the schedules move only every few steps
                    for run in runs:
                        run.tau_now = run.cfg.schedule.temperature(step)
                    engine.set_tau([run.tau_now for run in runs])  # a device write, no sync
                    tau_changes_at = min(run.cfg.schedule.next_change(step) for run in runs)
                stats = engine.train_step()
                if running is None:
                    running = TrainStats.zeros(stats.names, device, len(runs))
                    last_epoch = TrainStats.zeros(stats.names, device, len(runs))
                running.add_(stats)
                if step >= last_epoch_from:
                    last_epoch.add_(stats)
                    epoch_seen += 1
                step += 1
                since_log += 1
                here += 1

                if step % log_every == 0 or step == max_steps:
                    means = running.means(since_log)  # the one sync per interval
                    now = time.perf_counter()
                    train_seconds += now - t_log
                    steps_this_run += here
                    check_finite()
                    for s, run in enumerate(runs):
                        if run.failure is not None:
                            continue
                        for name, tag in task.train_tags.items():
                            run.writer.add_scalar(tag, means[name][s], step)
                        run.writer.add_scalar("train/tau", run.tau_now, step)
                        run.writer.add_scalar("train/lr", engine.lr(s), step)
                        run.writer.add_scalar("perf/steps_per_sec", here / (now - t_log), step)
                    bar.set_postfix(loss=f"{means['nelbo'][0]:.2f}", tau=f"{runs[0].tau_now:.3f}",
                                    val=f"{runs[0].last_val:.2f}")
                    bar.update(here)
                    running.values.zero_()
                    since_log = here = 0
                    t_log = time.perf_counter()

                if step % eval_every == 0 or step == max_steps:
                    evaluate_val()
                    t_log = time.perf_counter()

                if diag.every and step % diag.every == 0:
                    engine.sync_to_runs()
                    batch = splits.eval_targets(splits.val[: diag.batch])
                    for run in active():
                        figures = diagnose(run.parts.model, run.parts.estimator, batch, run.tau_now, diag)
                        for name, value in figures.items():
                            run.writer.add_scalar(f"grad/{name}", value, step)
                    t_log = time.perf_counter()

                if step % ckpt_every == 0 or step == max_steps or received:
                    checkpoint()
                    t_log = time.perf_counter()
                if received:
                    name = signal.Signals(received[0]).name
                    log.warning("%s: stopped at step %d, checkpoints %s", name, step,
                                ", ".join(str(r.ckpt_path) for r in active()))
                    raise Interrupted(f"{name} at step {step}: saved {saved_where(runs)}; run the same "
                                      "command with train.resume=true to continue", received[0])

        results: list[dict[str, Any] | NonFiniteError] = []
        engine.sync_to_runs()
        epoch_steps = min(max_steps, runs[0].parts.sampler.batches_per_epoch)
        epoch_means = (last_epoch.means(epoch_steps)["nelbo"] if last_epoch is not None
                       and epoch_seen == epoch_steps else None)
        for s, run in enumerate(runs):
            if run.failure is not None:
                results.append(run.failure)
                continue
            results.append(finish(run, engine, step,
                                  steps_this_run / train_seconds if train_seconds else float("nan"),
                                  time.perf_counter() - t_start,
                                  epoch_means[s] if epoch_means else None))
        return results
    finally:
        bar.close()
        for run in runs:
            if run.writer is not None:
                run.writer.close()


def finish(run: Run, engine: Engine, step: int, steps_per_sec: float, wall_seconds: float,
           train_nelbo_last_epoch: float | None) -> dict[str, Any]:
    """A run's final evaluation, metrics.json, hparams record and summary line."""
    model, evaluation, device = run.parts.model, run.cfg.eval, engine.device
    if not run.val_curve or run.val_curve[-1][0] != step:  # resumed from a checkpoint taken at the end
        run.val_curve.append([step, split_nelbo(model, engine.splits, "val", evaluation)])
    last_val = run.val_curve[-1][1]
    test = evaluate(model, engine.splits, evaluation, ("test",), bound=True, progress=True)
    test_nelbo, test_bound = test["test_nelbo"], test["test_bound"]
    run.writer.add_scalar("test/nelbo", test_nelbo, step)
    run.writer.add_scalar("test/bound", test_bound, step)
    run.writer.add_scalar("test/literal_bound", test["test_literal_bound"], step)
    metrics = {
        "status": "complete", "step": step, "val_nelbo": last_val, "val_nelbo_best": run.best_val,
        "test_nelbo": test_nelbo, "test_bound": test_bound, "test_literal_bound": test["test_literal_bound"],
        "num_samples": evaluation.num_samples,
        # steps_per_sec: this process's training rate; wall_seconds: the whole run's, every process
        # that trained it (up to its last checkpoint) included.
        "steps_per_sec": steps_per_sec, "wall_seconds": run.wall_before + wall_seconds, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "step_mode": engine.mode, "val_curve": run.val_curve,
        # The checkpoint the figures come from (written at this step): what gvae-eval and a table
        # check before setting other figures beside these.
        "checkpoint_sha256": run.ckpt_digest if run.ckpt_step == step else None,
        # What the figures belong to, so that a table can check the folder's config still says so.
        "run_config": ckpt.run_defining(run.cfg),
    }
    if train_nelbo_last_epoch is not None:  # not when a resume split the last epoch
        metrics["train_nelbo_last_epoch"] = train_nelbo_last_epoch
    log_config_and_hparams(run.writer, OmegaConf.create(run.config), {
        "val_nelbo": last_val, "val_nelbo_best": run.best_val, "test_nelbo": test_nelbo,
        "test_bound": test_bound}, run.settings)
    write_json(run.out_dir / "metrics.json", metrics)
    log.info("done in %.0f s: val -ELBO %.2f (best %.2f), test -ELBO %.2f, test bound (m=%d) %.2f; "
             "run folder %s; to inspect: tensorboard --logdir %s", metrics["wall_seconds"], last_val,
             run.best_val, test_nelbo, evaluation.num_samples, test_bound, run.out_dir,
             tensorboard_dir(run.out_dir))
    return metrics
