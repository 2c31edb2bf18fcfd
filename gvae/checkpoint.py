"""Checkpoints: what one holds (state/restore), written atomically, read back with weights_only=True,
and whether it belongs to the run that wants to resume from it."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gvae.config import Config, config_from_dict, container, flatten
from gvae.data import BatchSampler
from gvae.errors import CheckpointError, ConfigError
from gvae.files import atomic_write
from gvae.roles import keys_with

log = logging.getLogger(__name__)

KEYS = ("model", "estimator", "optimizer", "sampler", "rng", "step", "val_nelbo_best", "config")


def state(model: torch.nn.Module, estimator: torch.nn.Module, optimizer: torch.optim.Optimizer,
          sampler: BatchSampler, device: torch.device, step: int, val_nelbo_best: float,
          val_curve: list[list[float]], config: dict[str, Any], wall_seconds: float = 0.0,
          train_sums: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly: one dict. `train_sums`: the training figures
    summed since the last log and over the last epoch, so that a resumed run's records are a straight
    run's (its first log averages the whole interval; the last epoch's mean survives the resume)."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {"model": model.state_dict(), "estimator": estimator.state_dict(),
            "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng, "step": step,
            "val_nelbo_best": val_nelbo_best, "val_curve": val_curve, "config": config,
            "wall_seconds": wall_seconds,  # the run's time so far, over every process that trained it
            **({"train_sums": train_sums} if train_sums is not None else {})}


def load_fitting(module: Any, state: dict[str, Any], what: str, path: str = "the checkpoint") -> None:
    """module.load_state_dict(state), or CheckpointError naming `path` when the checkpoint's tensors do
    not fit it (a checkpoint of another model whose config was altered, its checksum valid)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = " ".join(lines[:2]) or type(e).__name__  # torch's heading and its first mismatch
        raise CheckpointError(f"{path}: its {what} does not fit this run's ({first}): it was written by "
                              "another model. Resume from the right run's checkpoint, or delete it to train "
                              "this run again.") from None


def restore(saved: dict[str, Any], model: torch.nn.Module, estimator: torch.nn.Module,
            optimizer: torch.optim.Optimizer, sampler: BatchSampler, device: torch.device) -> None:
    """Load a checkpoint's tensors and random states into freshly built components."""
    path = saved.get("path", "the checkpoint")
    load_fitting(model, saved["model"], "model", path)
    load_fitting(estimator, saved["estimator"], "estimator", path)
    load_fitting(optimizer, saved["optimizer"], "optimizer state", path)
    for state in optimizer.state.values():  # a pack's checkpoints before 2026-11-28 held transposed views
        for k, v in state.items():
            if torch.is_tensor(v) and not v.is_contiguous():
                state[k] = v.contiguous()
    sampler.load_state_dict(saved["sampler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in saved["rng"]:  # a CPU checkpoint has none
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)


# A checkpoint file is an envelope: the serialized state as bytes, and the SHA-256 of those bytes,
# written together in one atomic rename. Loading verifies the digest before unpickling anything.
FORMAT = "gvae-checkpoint/2"


def save_checkpoint(path: Path, state: dict[str, Any]) -> str:
    """Write atomically, with its checksum: a kill mid-save leaves the previous checkpoint. Returns
    the checksum, the state's identity in the records made from it (metrics.json, eval.json)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    envelope = {"format": FORMAT, "sha256": digest,
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    atomic_write(path, lambda f: torch.save(envelope, f))
    return digest


def _read(source: Any, path: Path) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); it is damaged or not a gvae checkpoint") from e


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, verified: its checksum, then tensors and plain containers
    only (weights_only: nothing arbitrary is unpickled), every entry present, of its type, finite.
    CheckpointError naming the file otherwise.

    CPU, whatever the training device: RNG states must be CPU tensors, and load_state_dict
    copies the rest to the parameters' device. The state's "sha256" is its checksum (None for a
    checkpoint written before checksums), the identity of the state in the records made from it.
    """
    state = _read(path, path)
    digest = None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        payload = state.get("payload")
        if not (torch.is_tensor(payload) and payload.dtype == torch.uint8):
            raise CheckpointError(f"{path} is damaged: its payload is missing")
        data = payload.numpy().tobytes()
        digest = state.get("sha256")
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written "
                                  "with it. Resume from a copy, or delete it to train this run again.")
        state = _read(io.BytesIO(data), path)
    elif isinstance(state, dict) and "model" in state:  # written before checkpoints had checksums
        log.warning("%s has no checksum (written by an older gvae): not verified", path)
    if isinstance(state, dict) and "best_val" in state and "val_nelbo_best" not in state:
        state["val_nelbo_best"] = state.pop("best_val")  # its name before 2026-11
    missing = [k for k in KEYS if k not in state] if isinstance(state, dict) else list(KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a gvae checkpoint: missing {missing}")
    _check_entries(path, state)
    state["sha256"], state["path"] = digest, str(path)  # where it came from, for the messages made later
    return state


def tensors(tree: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in nested dicts and lists, named from `prefix`."""
    if torch.is_tensor(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from tensors(v, f"{prefix}[{i}]")


def _check_entries(path: Path, state: dict[str, Any]) -> None:
    """Each entry of the type a run restores, and every float tensor finite."""
    types = {"model": dict, "estimator": dict, "optimizer": dict, "sampler": dict, "rng": dict,
             "config": dict, "step": int, "val_nelbo_best": (int, float)}
    for key, kind in types.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{path} is damaged: its {key!r} is a {type(state[key]).__name__}")
    if state["step"] < 0:
        raise CheckpointError(f"{path} is damaged: step {state['step']}")
    for key in ("model", "estimator", "optimizer"):
        for name, tensor in tensors(state[key], key):
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                raise CheckpointError(f"{path} holds non-finite values in {name}: a run is never "
                                      "saved so; the file is damaged")


def run_defining(cfg: Config | DictConfig) -> dict[str, Any]:
    """{key: value} of the keys that say what a checkpoint's tensors and random streams mean (their
    role defines the run, gvae/roles.py); the others (the length, cadences, evaluation, device,
    step mode, where the data are) may change when a run is resumed."""
    typed = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    return keys_with(typed, flatten(container(typed)), "defines_run")


def defining_values(values: dict[str, Any]) -> dict[str, Any]:
    """run_defining of a saved config's plain values (config_from_dict: typed again, keys added since
    at their defaults); ConfigError when they do not fit today's schema. Remembered by content: typing
    a config through OmegaConf is slow, and a table reads each run's config from three records (its
    .hydra/config.yaml, its checkpoint, its metrics.json) that usually hold the same values."""
    key = json.dumps(_numbers_as_floats(values), sort_keys=True, default=str)
    if key not in _DEFINING:
        _DEFINING[key] = json.dumps(run_defining(config_from_dict(values)))
    return json.loads(_DEFINING[key])  # a fresh copy: the caller may change it


_DEFINING: dict[str, str] = {}  # defining_values' results, as JSON, by their values' JSON


def _numbers_as_floats(node: Any) -> Any:
    """The values with every int (not bool) a float, for defining_values' key only: a YAML record's
    `0` and a checkpoint's `0.0` in one field are typed alike."""
    if isinstance(node, dict):
        return {k: _numbers_as_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers_as_floats(v) for v in node]
    return float(node) if isinstance(node, int) and not isinstance(node, bool) else node


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose value differs, "<absent>" for a missing one."""
    absent = "<absent>"
    return [(k, old.get(k, absent), new.get(k, absent)) for k in sorted(old.keys() | new.keys())
            if old.get(k, absent) != new.get(k, absent)]


def check_compatible(path: Path, saved: dict[str, Any], config: dict[str, Any]) -> None:
    """CheckpointError naming every run-defining key whose value differs between the checkpoint's
    config and `config` (plain values): resuming with another model, estimator, data, schedule or
    optimizer would fail inside load_state_dict, or worse, silently train a different run. The
    saved config is typed again first, so keys added to gvae since it was written count as their
    defaults."""
    try:
        differ = config_differences(defining_values(saved), defining_values(config))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if differ:
        details = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in differ)
        raise CheckpointError(
            f"{path} was written by a different configuration ({details}). Resume with the "
            "checkpoint's values, or start a new run folder (another hydra.run.dir, or hydra.sweep.dir for "
            "a sweep)."
        )

