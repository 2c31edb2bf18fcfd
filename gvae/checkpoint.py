"""Checkpoints: what one holds (state/restore), written atomically, read back with weights_only=True,
and whether it belongs to the run that wants to resume from it."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from gvae.config import config_from_dict, container, flatten
from gvae.data import BatchSampler
from gvae.errors import CheckpointError, ConfigError
from gvae.estimators import Estimator
from gvae.files import atomic_write
from gvae.model import VAE

KEYS = ("model", "estimator", "optimizer", "sampler", "rng", "step", "val_nelbo_best", "config")
# The config keys that say what a checkpoint's tensors and random streams mean. The others
# (max_steps, cadences, evaluation, device, step mode, where the data lives) may change when a run
# is resumed.
RUN_KEYS = ("data", "model", "estimator", "schedule", "optim", "seed", "train.batch_size", "train.precision")
RESUMABLE_KEYS = ("data.root", "data.download", "data.mirrors")


def state(model: VAE, estimator: Estimator, optimizer: torch.optim.Optimizer, sampler: BatchSampler,
          device: torch.device, step: int, val_nelbo_best: float, val_curve: list[list[float]],
          config: dict[str, Any]) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly: one dict."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {"model": model.state_dict(), "estimator": estimator.state_dict(),
            "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng, "step": step,
            "val_nelbo_best": val_nelbo_best, "val_curve": val_curve, "config": config}


def restore(saved: dict[str, Any], model: VAE, estimator: Estimator, optimizer: torch.optim.Optimizer,
            sampler: BatchSampler, device: torch.device) -> None:
    """Load a checkpoint's tensors and random states into freshly built components."""
    model.load_state_dict(saved["model"])
    estimator.load_state_dict(saved["estimator"])
    optimizer.load_state_dict(saved["optimizer"])
    sampler.load_state_dict(saved["sampler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in saved["rng"]:  # a CPU checkpoint has none
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill mid-save leaves the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU without unpickling arbitrary objects (tensors and plain
    containers only); CheckpointError if the file is damaged or not one of ours.

    CPU, whatever the training device: RNG states must be CPU tensors, and load_state_dict
    copies the rest to the parameters' device.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); it is damaged or not a gvae checkpoint") from e
    if isinstance(state, dict) and "best_val" in state and "val_nelbo_best" not in state:
        state["val_nelbo_best"] = state.pop("best_val")  # its name before 2026-11
    missing = [k for k in KEYS if k not in state] if isinstance(state, dict) else list(KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a gvae checkpoint: missing {missing}")
    return state


def check_compatible(path: Path, saved: dict[str, Any], config: dict[str, Any]) -> None:
    """CheckpointError naming every run-defining key whose value differs between the checkpoint's
    config and `config` (plain values): resuming with another model, estimator, data, schedule or
    optimizer would fail inside load_state_dict, or worse, silently train a different run. The
    saved config is typed again first, so keys added to gvae since it was written count as their
    defaults."""
    try:
        old = flatten(container(config_from_dict(saved)))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    new = flatten(config)

    def run_defining(key: str) -> bool:
        return key not in RESUMABLE_KEYS and any(key == k or key.startswith(k + ".") for k in RUN_KEYS)

    absent = "<absent>"
    differ = sorted(k for k in old.keys() | new.keys()
                    if run_defining(k) and old.get(k, absent) != new.get(k, absent))
    if differ:
        details = "; ".join(f"{k}: {old.get(k, absent)!r} in the checkpoint, {new.get(k, absent)!r} now"
                            for k in differ)
        raise CheckpointError(
            f"{path} was written by a different configuration ({details}). Resume with the "
            "checkpoint's values, or start a new run folder (another hydra.run.dir)."
        )

