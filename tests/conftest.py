"""Shared fixtures: composing configs the way `gvae-train` does, and the offline MNIST copy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gvae.config import compose_config, register_configs

__all__ = ["SMALL", "TINY", "compose_config"]  # the tests import these from here
register_configs()  # for the tests that compose with Hydra's own API

# A run small enough for the 2-core CI machine: few steps, small evaluation.
TINY = [
    "train.max_steps=40", "train.log_every=10", "train.eval_every=20", "train.ckpt_every=20",
    "train.batch_size=50", "eval.num_samples=4", "eval.batch_size=2000", "eval.max_rows=4000",
    "device=cpu",
]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The offline MNIST copy named by $GVAE_DATA_DIR (CI sets it to ../shared/data)."""
    root = os.environ.get("GVAE_DATA_DIR")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        pytest.skip("set GVAE_DATA_DIR to the folder holding MNIST/raw/ to run tests on real MNIST")
    return Path(root)


# TINY with a small network and validation set: runs that check plumbing in seconds.
SMALL = [o for o in TINY if not o.startswith("train.eval_every=")] + [
    "train.eval_every=20", "data.num_val=1000", "eval.images=false", "model.hidden=[32]"]


@pytest.fixture(scope="session")
def tiny_sweep(mnist_root, tmp_path_factory) -> Path:
    """A finished multirun of two SMALL jobs (seeds 0 and 1), started as a user would. Tests that
    change it work on a copy."""
    work = tmp_path_factory.mktemp("tiny_sweep")
    sweep_dir = work / "multirun"
    result = subprocess.run(
        [sys.executable, "-m", "gvae.train", "-m", "seed=0,1", *SMALL, f"hydra.sweep.dir={sweep_dir}"],
        cwd=work, env={**os.environ, "GVAE_DATA_DIR": str(mnist_root)}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir
