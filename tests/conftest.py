"""Shared fixtures: configs composed the way `gvae-train` composes them and shrunk for the 2-core CI
machine, the offline MNIST copy, a finished tiny sweep, and `gvae-train` started as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from gvae.config import compose_config, register_configs
from gvae.mnist import IDX_FILES

# The tests import these from here.
__all__ = ["SMALL", "SYNTHETIC", "TINY", "compose_config", "estimator_overrides", "gvae_train"]
register_configs()  # for the tests that compose with Hydra's own API

# A run small enough for the 2-core CI machine: few steps, small evaluation.
TINY = [
    "train.max_steps=40", "train.log_every=10", "train.eval_every=20", "train.ckpt_every=20",
    "train.batch_size=50", "eval.num_samples=4", "eval.batch_size=2000", "eval.max_rows=4000",
    "device=cpu",
]
# TINY with a small network and validation set: runs that check plumbing in seconds.
SMALL = [o for o in TINY if not o.startswith("train.eval_every=")] + [
    "train.eval_every=20", "data.num_val=1000", "eval.images=false", "model.hidden=[32]"]
# TINY on the in-memory dataset, whose structure a 4x4 categorical latent fits: no files at all.
SYNTHETIC = [*TINY, "data=synthetic", "model.num_vars=4", "model.num_classes=4", "model.hidden=[64]"]


def estimator_overrides(name: str) -> list[str]:
    """`estimator=NAME`, with the task objective it trains when that is not the default one (vimco:
    the K-sample bound), so that a test over every estimator composes a config each accepts."""
    from gvae.estimators import ESTIMATORS

    iwae_only = "elbo" not in ESTIMATORS[name].objectives
    return [f"estimator={name}", *(["task.objective=iwae"] if iwae_only else [])]


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> tuple[DictConfig, Path]:
    """(a SYNTHETIC config, a fresh run folder in tmp_path), as lightning-hydra-template's tests do."""
    return compose_config(SYNTHETIC), tmp_path / "run"


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The offline MNIST copy named by $GVAE_DATA_DIR (CI sets it to ../shared/data)."""
    root = os.environ.get("GVAE_DATA_DIR")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        pytest.skip("set GVAE_DATA_DIR to the folder holding MNIST/raw/ to run tests on real MNIST")
    return Path(root)


@pytest.fixture
def gz_copy(mnist_root: Path, tmp_path: Path) -> Path:
    """A writable MNIST/raw/ holding copies of the four .gz files only; returns that folder."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        (raw / f"{name}.gz").write_bytes((mnist_root / "MNIST" / "raw" / f"{name}.gz").read_bytes())
    return raw


def gvae_train(args: list[str], cwd: Path, wait: bool = True, env: dict | None = None):
    """`python -m gvae.train ARGS` in cwd, as a user would start it, output (stdout and stderr)
    captured: the finished CompletedProcess, or with wait=False the running Popen."""
    cmd = [sys.executable, "-m", "gvae.train", *args]
    if wait:
        return subprocess.run(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=300)
    return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def tiny_sweep(mnist_root, tmp_path_factory) -> Path:
    """A finished multirun of two SMALL jobs (seeds 0 and 1), started as a user would. Tests that
    change it work on a copy."""
    work = tmp_path_factory.mktemp("tiny_sweep")
    sweep_dir = work / "multirun"
    result = gvae_train(["-m", "seed=0,1", *SMALL, f"hydra.sweep.dir={sweep_dir}"], work)
    assert result.returncode == 0, result.stdout[-3000:]
    return sweep_dir
