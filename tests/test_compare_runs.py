"""scripts/compare_runs.py: the same seeded run twice is identical to the bit; another seed is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gvae.jobs import train
from tests.conftest import SYNTHETIC, compose_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"


def compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True,
                          timeout=300)


def test_the_same_seeded_run_twice_is_identical_and_another_seed_is_not(tmp_path):
    run = [*SYNTHETIC, "train.max_steps=20", "eval.images=false"]
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(compose_config([*run, f"seed={seed}"]), tmp_path / folder / "job")
    same = compare(tmp_path / "a", tmp_path / "b")
    assert same.returncode == 0 and "job: identical" in same.stdout, same.stdout + same.stderr
    other = compare(tmp_path / "a", tmp_path / "c")
    assert other.returncode == 1 and "model.encoder.0.weight: differs" in other.stdout, other.stdout
