"""Train a discrete-latent VAE: `gvae-train [overrides]`, `gvae-train -m ...` for sweeps.

The config is checked and turned into typed objects once (config.validate); the loop below reads
plain attributes and locals only. Everything per step stays on the device; the host reads the
accumulated figures once per log interval, and checks then that they are finite. SIGTERM and
SIGINT save a checkpoint and stop; `train.resume=true` continues a run or a sweep
(docs/robustness.md).
"""

from __future__ import annotations

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
from typing import Any

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
    import_extensions,
    register_configs,
    resolve_device,
    validate,
)
from gvae.data import BatchSampler, Splits, load_splits
from gvae.diagnostics import diagnose
from gvae.errors import CheckpointError, ConfigError, GvaeError, Interrupted, NonFiniteError
from gvae.estimators import Estimator, build_estimator
from gvae.evaluation import eval_generator, evaluate, split_nelbo
from gvae.files import write_json
from gvae.model import VAE
from gvae.objective import TrainStats
from gvae.step import StepFn, make_train_step, optimizer_kwargs, resolve_mode
from gvae.summaries import log_config_and_hparams, log_images, log_layout

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# building


@dataclass
class Training:
    """Everything the training loop needs, built from the config."""

    device: torch.device
    splits: Splits
    sampler: BatchSampler
    model: VAE
    estimator: Estimator
    optimizer: torch.optim.Optimizer
    mode: str
    step: StepFn
    tau: torch.Tensor  # a device tensor, so a compiled step never recompiles when tau changes


def build_training(cfg: Config | DictConfig, saved: dict | None = None) -> Training:
    """Seed, load the data onto the device, build the model, estimator, optimizer and step, and
    restore the checkpoint `saved` (before the step is made: a captured graph keeps its tensors'
    addresses)."""
    if isinstance(cfg, DictConfig):
        cfg = validate(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    torch.manual_seed(cfg.seed)
    splits = load_splits(cfg.data, device)
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
    train_step = make_train_step(model, estimator, optimizer, splits, cfg.train.precision, mode,
                                 cfg.train.batch_size)
    tau = torch.tensor(cfg.schedule.temperature(step), device=device)
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
    """The folder to point TensorBoard at: a sweep's, so its jobs sit side by side, or the run's."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return out_dir.parent
    return out_dir


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


def train(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Train per `cfg`, writing TensorBoard events, checkpoints and metrics.json under out_dir."""
    typed = validate(cfg)  # before anything is written
    config = container(cfg)  # plain values for the checkpoint and the logs
    ckpt_dir = out_dir / "checkpoints"
    ckpt_path = ckpt_dir / "last.pt"
    saved = None
    if typed.train.resume:
        if ckpt_path.exists():
            saved = ckpt.load_checkpoint(ckpt_path)
            ckpt.check_compatible(ckpt_path, saved["config"], config)
        if (done := finished_metrics(out_dir, typed.train.max_steps)) is not None:
            log.info("%s already finished %d steps (train.resume=true): nothing to do", out_dir, done["step"])
            return done
        if saved is None:
            log.info("train.resume=true but no checkpoint in %s: starting from step 0", ckpt_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = build_training(typed, saved)
    device, splits, sampler, model, estimator, optimizer = (
        run.device, run.splits, run.sampler, run.model, run.estimator, run.optimizer)
    schedule, evaluation, diag = typed.schedule, typed.eval, typed.diag
    max_steps, log_every = typed.train.max_steps, typed.train.log_every
    eval_every, ckpt_every = typed.train.eval_every, typed.train.ckpt_every
    step, best_val = (saved["step"], saved["val_nelbo_best"]) if saved else (0, float("inf"))
    # [step, validation nelbo] at each evaluation: the curve of the paper's Figure 4, kept in the
    # checkpoint so that a resumed run reports all of it (older checkpoints have none).
    val_curve: list[list[float]] = [list(p) for p in saved.get("val_curve", [])] if saved else []
    if saved:
        log.info("resumed from %s at step %d", ckpt_path, step)
    # What a divergence corrupts: parameters, and estimator baselines (buffers).
    watched = [*model.parameters(), *estimator.parameters(), *estimator.buffers()]
    finite_at = step  # the last step at which the watched tensors were seen finite
    ckpt_step = saved["step"] if saved else None  # the step of the last good checkpoint

    def non_finite(what: str) -> NonFiniteError:
        kept = (f"the last good checkpoint, {ckpt_path} (step {ckpt_step}), is kept" if ckpt_step is not None
                else "no checkpoint had been written")
        return NonFiniteError(f"{what}; {kept}. Lower optim.lr or change the estimator's settings.")

    def check_finite() -> None:
        """One host read of the figures accumulated since the last log and of the watched tensors."""
        nonlocal finite_at
        if not all_finite(running.values, *watched):
            raise non_finite(f"non-finite loss or parameters between steps {finite_at} and {step}")
        finite_at = step

    def checkpoint() -> None:
        nonlocal ckpt_step
        check_finite()  # never replace a good checkpoint with a diverged run
        ckpt_dir.mkdir(exist_ok=True)
        ckpt.save_checkpoint(ckpt_path, ckpt.state(model, estimator, optimizer, sampler, device, step,
                                                   best_val, val_curve, config))
        ckpt_step = step

    def evaluate_val() -> float:
        val = split_nelbo(model, splits, "val", evaluation)
        if evaluation.images:
            model.eval()
            log_images(writer, model, splits.eval_targets(splits.val[:32]), step, eval_generator(device))
            model.train()
        return val

    tau = run.tau
    tau_now, tau_changes_at = schedule.temperature(step), schedule.next_change(step)
    # Resuming: the same folder, where the events logged after the checkpoint (before a crash) are
    # hidden, since this run logs those steps again.
    writer = SummaryWriter(str(out_dir), purge_step=step + 1 if saved else None)
    log_layout(writer)
    log.info("device %s, step mode %s, %d parameters, output %s",
             device, run.mode, sum(p.numel() for p in model.parameters()), out_dir)
    running = TrainStats.zeros(device)  # sums of the step's figures since the last log
    # The training -ELBO averaged over the last epoch (the ReinMax benchmark's metric).
    last_epoch = TrainStats.zeros(device)
    last_epoch_from = max_steps - sampler.batches_per_epoch
    since_log, last_val = 0, float("nan")
    train_seconds, steps_this_run = 0.0, 0
    t_start = t_log = time.perf_counter()
    bar = tqdm(total=max_steps, initial=step, disable=None, dynamic_ncols=True, unit="step")
    try:
        with logging_redirect_tqdm(), deferred_signals() as received:
            while step < max_steps:
                if step >= tau_changes_at:  # the schedule moves only every few steps
                    tau_now, tau_changes_at = schedule.temperature(step), schedule.next_change(step)
                    tau.fill_(tau_now)  # a device write, no sync
                stats = run.step(sampler.next(), tau)
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
                    lr = optimizer.param_groups[0]["lr"]
                    # train/loss is the negative ELBO at the training sample (its name since the
                    # start); train/surrogate the loss the optimizer minimises.
                    scalars = {"train/loss": means["nelbo"], "train/surrogate": means["surrogate"],
                               "train/recon": means["recon"], "train/kl": means["kl"], "train/tau": tau_now,
                               "train/lr": lr, "perf/steps_per_sec": since_log / (now - t_log)}
                    for tag, value in scalars.items():
                        writer.add_scalar(tag, value, step)
                    bar.set_postfix(loss=f"{means['nelbo']:.2f}", tau=f"{tau_now:.3f}", val=f"{last_val:.2f}")
                    bar.update(since_log)
                    running.values.zero_()
                    since_log = 0
                    t_log = time.perf_counter()

                if step % eval_every == 0 or step == max_steps:
                    last_val = evaluate_val()
                    if not math.isfinite(last_val):
                        raise non_finite(f"the validation nelbo is {last_val} at step {step}")
                    best_val = min(best_val, last_val)
                    val_curve.append([step, last_val])
                    writer.add_scalar("val/nelbo", last_val, step)
                    writer.flush()
                    log.info("step %d  val nelbo %.3f", step, last_val)
                    t_log = time.perf_counter()

                if diag.every and step % diag.every == 0:
                    batch = splits.eval_targets(splits.val[: diag.batch])
                    figures = diagnose(model, estimator, batch, tau, diag)
                    for name, value in figures.items():
                        writer.add_scalar(f"grad/{name}", value, step)
                    t_log = time.perf_counter()

                if step % ckpt_every == 0 or step == max_steps or received:
                    checkpoint()
                    t_log = time.perf_counter()
                if received:
                    name = signal.Signals(received[0]).name
                    log.warning("%s: stopped at step %d, checkpoint %s", name, step, ckpt_path)
                    raise Interrupted(f"{name} at step {step}: saved {ckpt_path}; run the same command "
                                      "with train.resume=true to continue", received[0])

        if not val_curve or val_curve[-1][0] != step:  # resumed from a checkpoint taken at the end
            val_curve.append([step, split_nelbo(model, splits, "val", evaluation)])
        last_val = val_curve[-1][1]
        test = evaluate(model, splits, evaluation, ("test",), bound=True, progress=True)
        test_nelbo, test_bound = test["test_nelbo"], test["test_bound"]
        writer.add_scalar("test/nelbo", test_nelbo, step)
        writer.add_scalar("test/bound", test_bound, step)
        metrics = {
            "status": "complete", "step": step, "val_nelbo": last_val, "val_nelbo_best": best_val,
            "test_nelbo": test_nelbo, "test_bound": test_bound, "num_samples": evaluation.num_samples,
            "steps_per_sec": steps_this_run / train_seconds if train_seconds else float("nan"),
            "wall_seconds": time.perf_counter() - t_start, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "step_mode": run.mode, "val_curve": val_curve,
        }
        if saved is None or saved["step"] <= last_epoch_from:  # not when a resume split the last epoch
            epoch_steps = min(max_steps, sampler.batches_per_epoch)
            metrics["train_nelbo_last_epoch"] = last_epoch.means(epoch_steps)["nelbo"]
        log_config_and_hparams(writer, cfg, {
            "val_nelbo": last_val, "val_nelbo_best": best_val, "test_nelbo": test_nelbo,
            "test_bound": test_bound}, command_line_settings(cfg))
        write_json(out_dir / "metrics.json", metrics)
        log.info("done in %.0f s: val -ELBO %.2f (best %.2f), test -ELBO %.2f, test bound (m=%d) %.2f; "
                 "run folder %s; to inspect: tensorboard --logdir %s", metrics["wall_seconds"], last_val,
                 best_val, test_nelbo, evaluation.num_samples, test_bound, out_dir, tensorboard_dir(out_dir))
        return metrics
    finally:
        bar.close()
        writer.close()


# -----------------------------------------------------------------------------
# entry point


def register_plugins() -> None:
    """gvae's Hydra plugins (hydra_plugins/gvae_plugins). Hydra finds plugins by listing the
    hydra_plugins namespace, which an editable install does not let it list: register them here."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.gvae_plugins.rows_sweeper import RowsSweeper

    Plugins.instance().register(RowsSweeper)


import_extensions()
register_configs()
register_plugins()


@hydra.main(version_base="1.3", config_path=config_path(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: train in Hydra's output folder; return the best validation negative
    ELBO, the figure a sweeper (Optuna, Ax) minimises: selection never sees the test set."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        val_nelbo_best = train(cfg, out_dir)["val_nelbo_best"]
    except Interrupted as e:
        write_json(out_dir / "failed.json", {"status": "interrupted", "error": str(e)})
        raise SystemExit(128 + e.signum) from None  # a sweep stops too: the machine is going away
    except GvaeError as e:
        log.error("%s", e)
        # A wrong command (bad value, another run's checkpoint) writes nothing but Hydra's log.
        if not isinstance(e, (ConfigError, CheckpointError)):
            write_json(out_dir / "failed.json", {"status": "failed", "error": f"{type(e).__name__}: {e}"})
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and goes on with the others
        raise SystemExit(1) from None
    (out_dir / "failed.json").unlink(missing_ok=True)  # a resumed run that failed before has now finished
    return val_nelbo_best


if __name__ == "__main__":
    main()
