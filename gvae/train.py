"""Train a discrete-latent VAE on MNIST: `gvae-train [overrides]`, `gvae-train -m ...` for sweeps.

The loop is written out top to bottom. Everything per step stays on the device; the host
reads the accumulated metrics once per log interval.
"""

from __future__ import annotations

import json
import logging
import os
import time
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

from gvae.checkpoint import load_checkpoint, save_checkpoint
from gvae.config import register_configs, resolve_device, validate
from gvae.errors import GvaeError, NonFiniteError
from gvae.objective import multi_sample_bound, negative_elbo
from gvae.schedules import temperature
from gvae.step import build_training
from gvae.summaries import log_config_and_hparams, log_images

log = logging.getLogger(__name__)
EVAL_SEED = 1234  # evaluation noise is the same at every evaluation: comparable validation curves


# -----------------------------------------------------------------------------
# helpers


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def eval_generator(device: torch.device) -> torch.Generator:
    """A fresh generator with a fixed seed for evaluation, apart from the training stream."""
    return torch.Generator(device=device).manual_seed(EVAL_SEED)


def all_finite(*tensors: torch.Tensor) -> bool:
    """One host read: are all these tensors finite?"""
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())


# -----------------------------------------------------------------------------
# training


def train(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Train per `cfg`, writing TensorBoard events, checkpoints and metrics.json under out_dir."""
    validate(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_path = ckpt_dir / "last.pt"
    state = load_checkpoint(ckpt_path, device) if cfg.train.resume and ckpt_path.exists() else None
    run = build_training(cfg, state)
    splits, sampler, model, estimator, optimizer = (
        run.splits, run.sampler, run.model, run.estimator, run.optimizer)
    step, best_val = (state["step"], state["best_val"]) if state else (0, float("inf"))
    if state:
        log.info("resumed from %s at step %d", ckpt_path, step)

    def checkpoint() -> None:
        if not all_finite(*model.parameters()):
            raise NonFiniteError(f"non-finite parameters at step {step}; kept the last good checkpoint")
        ckpt_dir.mkdir(exist_ok=True)
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "estimator": estimator.state_dict(),
            "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng,
            "step": step, "best_val": best_val,
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        })

    def evaluate_val() -> float:
        model.eval()
        val = negative_elbo(model, splits.val, splits.eval_targets, cfg.eval.batch_size,
                            eval_generator(device)).item()
        if cfg.eval.images:
            log_images(writer, model, splits.eval_targets(splits.val[:32]), step, eval_generator(device))
        model.train()
        return val

    tau, tau_now = run.tau, temperature(cfg.schedule, step)
    writer = SummaryWriter(str(out_dir))
    log.info("device %s, step mode %s, %d parameters, output %s",
             device, run.mode, sum(p.numel() for p in model.parameters()), out_dir)
    running = torch.zeros(3, device=device)  # sums of [loss, recon, kl] since the last log
    since_log, last_val = 0, float("nan")
    train_seconds, steps_this_run = 0.0, 0
    t_start = t_log = time.perf_counter()
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=None, dynamic_ncols=True, unit="step")
    try:
        with logging_redirect_tqdm():
            while step < cfg.train.max_steps:
                if (tau_next := temperature(cfg.schedule, step)) != tau_now:
                    tau_now = tau_next
                    tau.fill_(tau_now)  # a device write, no sync
                running += run.step(sampler.next(), tau)
                step += 1
                since_log += 1

                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    loss, recon, kl = (running / since_log).tolist()  # the one sync per interval
                    now = time.perf_counter()
                    train_seconds += now - t_log
                    steps_this_run += since_log
                    if not all_finite(running, *model.parameters()):
                        raise NonFiniteError(
                            f"non-finite loss or parameters between steps {step - since_log} and {step}; "
                            f"the last good checkpoint is {ckpt_path}"
                        )
                    lr = optimizer.param_groups[0]["lr"]
                    for tag, value in [("train/loss", loss), ("train/recon", recon), ("train/kl", kl),
                                       ("train/tau", tau_now),
                                       ("train/lr", lr), ("perf/steps_per_sec", since_log / (now - t_log))]:
                        writer.add_scalar(tag, value, step)
                    bar.set_postfix(loss=f"{loss:.2f}", tau=f"{tau_now:.3f}", val=f"{last_val:.2f}")
                    bar.update(since_log)
                    running.zero_()
                    since_log = 0
                    t_log = time.perf_counter()

                if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                    last_val = evaluate_val()
                    best_val = min(best_val, last_val)
                    writer.add_scalar("val/nelbo", last_val, step)
                    writer.flush()
                    log.info("step %d  val nelbo %.3f", step, last_val)
                    t_log = time.perf_counter()

                if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps:
                    checkpoint()
                    t_log = time.perf_counter()

        model.eval()
        test_nelbo = negative_elbo(model, splits.test, splits.eval_targets, cfg.eval.batch_size,
                                   eval_generator(device)).item()
        test_bound = multi_sample_bound(model, splits.test, splits.eval_targets, cfg.eval.num_samples,
                                        cfg.eval.max_rows, eval_generator(device)).item()
        writer.add_scalar("test/nelbo", test_nelbo, step)
        writer.add_scalar("test/bound", test_bound, step)
        metrics = {
            "status": "complete", "step": step, "val_nelbo_best": best_val, "test_nelbo": test_nelbo,
            "test_bound": test_bound, "num_samples": cfg.eval.num_samples,
            "steps_per_sec": steps_this_run / train_seconds if train_seconds else float("nan"),
            "wall_seconds": time.perf_counter() - t_start, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "step_mode": run.mode,
        }
        log_config_and_hparams(writer, cfg, {
            "val_nelbo_best": best_val, "test_nelbo": test_nelbo, "test_bound": test_bound})
        write_json(out_dir / "metrics.json", metrics)
        log.info("test nelbo %.3f, test bound (m=%d) %.3f", test_nelbo, cfg.eval.num_samples, test_bound)
        return metrics
    finally:
        bar.close()
        writer.close()


# -----------------------------------------------------------------------------
# entry point

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://gvae.configs", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: train in Hydra's output folder; return the test bound (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return train(cfg, out_dir)["test_bound"]
    except GvaeError as e:
        log.error("%s", e)
        write_json(out_dir / "failed.json", {"status": "failed", "error": f"{type(e).__name__}: {e}"})
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job and goes on with the others
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
