"""Checkpoints: one dict per file, written atomically, read back with weights_only=True."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gvae.errors import CheckpointError
from gvae.files import atomic_write

KEYS = ("model", "estimator", "optimizer", "sampler", "rng", "step", "best_val", "config")
# The config keys that say what a checkpoint's tensors and random streams mean. The others
# (max_steps, cadences, evaluation, device, step mode, where the data lives) may change when a run
# is resumed.
RUN_KEYS = ("data", "model", "estimator", "schedule", "optim", "seed", "train.batch_size", "train.precision")
RESUMABLE_KEYS = ("data.root", "data.download", "data.mirrors")


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
    missing = [k for k in KEYS if k not in state] if isinstance(state, dict) else list(KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a gvae checkpoint: missing {missing}")
    return state


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.key: value} for the dicts in a plain config container; lists stay values."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, child in node.items() for k, v in _flatten(child, f"{prefix}{key}.").items()}


def check_compatible(path: Path, saved: dict[str, Any], cfg: DictConfig) -> None:
    """CheckpointError naming every run-defining key whose value differs between the checkpoint's
    config and `cfg`: resuming with another model, estimator, data, schedule or optimizer would
    fail inside load_state_dict, or worse, silently train a different run."""
    old = _flatten(saved)
    new = _flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))

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
