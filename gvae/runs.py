"""Finished runs on disk: finding their folders, reading their config, loading their model.

A run folder is what `gvae-train` writes: `.hydra/config.yaml` (the run's own config),
`checkpoints/last.pt`, `metrics.json`. A sweep folder holds one run folder per job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gvae.checkpoint import check_compatible, load_checkpoint, load_fitting
from gvae.config import Config, config_from_dict, container, validate
from gvae.errors import ConfigError, GvaeError
from gvae.roles import roles
from gvae.run_folder import live_holder
from gvae.tasks import Task, build_task


class RunError(GvaeError):
    """A folder is not a run or a sweep, or a run cannot be used as asked; the message names it."""


def natural_key(path: Path) -> list[Any]:
    """Sort key: job folders 2 before 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(paths: list[Path]) -> list[Path]:
    """The run folders named by `paths`: each a run folder, or a folder holding run folders
    (a sweep: every job in it, in job order). RunError naming a path that holds no run."""
    runs: list[Path] = []
    for path in paths:
        if (path / ".hydra" / "config.yaml").is_file():
            runs.append(path)
            continue
        jobs = sorted((p.parent.parent for p in path.glob("**/.hydra/config.yaml")), key=natural_key)
        if not jobs:
            raise RunError(f"{path} is neither a run folder (no .hydra/config.yaml) nor a folder of runs")
        runs += jobs
    return list(dict.fromkeys(runs))  # a run named twice is evaluated once


def run_config(run_dir: Path, overrides: list[str] = ()) -> Config:
    """The run's own config (.hydra/config.yaml, resolved now, so `data.root` follows this machine's
    $GVAE_DATA_DIR), typed and checked, with `overrides` ("key=value") applied. Only the keys that
    evaluation may set (their role, gvae/roles.py: eval.*, device, where the data are) may be
    overridden: the others say what the checkpoint means."""
    try:
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    except (OSError, OmegaConfBaseException) as e:
        raise RunError(f"{run_dir / '.hydra' / 'config.yaml'} cannot be read: {e}") from e
    cfg = config_from_dict(saved)
    allowed = {k for k, role in roles(OmegaConf.to_object(cfg)) if role.eval_may_set}
    for override in overrides:
        key, sep, _ = override.partition("=")
        # A key under an allowed group passes here, so that a misspelt one is named by the merge below.
        if not sep or not any(key == a or key.startswith(a + ".") for a in allowed):
            raise ConfigError(f"{override!r}: only {settable(allowed)} may be set here (key=value)")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{override!r} is not allowed: {str(e).splitlines()[0]}") from None
    return validate(cfg)


def settable(keys: set[str]) -> str:
    """The keys, a group whose keys are all in them written once as GROUP.*: "data.root, eval.*"."""
    shown = [k + (".*" if any(other.startswith(k + ".") for other in keys) else "") for k in sorted(keys)
             if k.rpartition(".")[0] not in keys]
    return ", ".join(shown)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON record, or None if the file does not exist; RunError if it cannot be read."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read: {e}") from e


def run_status(run_dir: Path) -> tuple[str, str | None]:
    """(status, why): "complete", or "running" (a live process on this machine holds the folder: a
    failed.json there is from before it resumed), "failed", "interrupted" (failed.json says which and
    why) or "unfinished" (crashed, killed, or running elsewhere: no complete metrics.json)."""
    if (holder := live_holder(run_dir)) is not None:
        return "running", f"training now ({holder})"
    failed = read_json(run_dir / "failed.json")
    if failed is not None:
        status = "interrupted" if failed.get("status") == "interrupted" else "failed"
        return status, failed.get("error", "no message")
    metrics = read_json(run_dir / "metrics.json")
    if metrics is None or metrics.get("status") != "complete":
        return "unfinished", "no complete metrics.json (crashed, killed or still running)"
    return "complete", None


def unfinished(run_dir: Path) -> str | None:
    """Why a run folder holds no finished run (failed, interrupted, still running), or None."""
    status, why = run_status(run_dir)
    if status == "complete":
        return None
    return "not finished (no complete metrics.json)" if status == "unfinished" else f"{status}: {why}"


def load_model(run_dir: Path, cfg: Config, device: torch.device) -> tuple[Task, int, str | None]:
    """The trained model of a run, from checkpoints/last.pt (weights_only), its step and its checksum
    (the state's identity in the records made from it; None for a checkpoint without one)."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        raise RunError(f"{path} does not exist: the run has no checkpoint")
    state = load_checkpoint(path)
    check_compatible(path, state["config"], container(cfg))
    model = build_task(cfg).to(device)
    load_fitting(model, state["model"], "model", str(path))
    model.eval()
    return model, int(state["step"]), state["sha256"]
