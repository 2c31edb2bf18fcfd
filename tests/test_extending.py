"""Adding an estimator is one class and one YAML: a toy one, in a module and a config folder of its
own, trains from the command line and reaches the results table, with no other file changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOY_MODULE = '''
from dataclasses import dataclass

from gvae.estimators import EstimatorConfig, Reparameterized, register, straight_through


@dataclass
class ToyConfig(EstimatorConfig):
    name: str = "toy"
    slope: float = 2.0


@register(ToyConfig)
class Toy(Reparameterized):
    """Toy: an exact sample forward, the gradient through softmax(slope * logits) backward."""

    def sample(self, logits, tau):
        soft = self.latent.relax(logits, 1 / self.cfg.slope)
        return straight_through(self.latent.sample(logits.detach()), soft)
'''
TOY_YAML = "# A toy estimator for the tests.\ndefaults:\n  - toy_schema\n  - _self_\n"
SMALL_RUN = ["data=synthetic", "model.num_vars=4", "model.num_classes=4", "model.hidden=[32]",
             "train.max_steps=30", "train.log_every=10", "train.eval_every=10", "train.batch_size=50",
             "eval.num_samples=2", "eval.images=false", "device=cpu"]


@pytest.fixture
def toy(tmp_path) -> tuple[Path, dict[str, str]]:
    """(the config folder holding estimator/toy.yaml, an environment that imports toy_estimator)."""
    (tmp_path / "toy_estimator.py").write_text(TOY_MODULE)
    (tmp_path / "configs" / "estimator").mkdir(parents=True)
    (tmp_path / "configs" / "estimator" / "toy.yaml").write_text(TOY_YAML)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "GVAE_IMPORT": "toy_estimator"}
    return tmp_path / "configs", env


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.mark.slow
def test_a_toy_estimator_trains_from_the_cli_with_typed_options_and_reaches_the_table(toy, tmp_path):
    configs, env = toy
    searchpath = f"hydra.searchpath=[file://{configs}]"
    sweep = tmp_path / "sweep"
    run(["-m", "gvae.train", "-m", searchpath, "estimator=toy,straight_through", "seed=0,1", *SMALL_RUN,
         f"hydra.sweep.dir={sweep}"], tmp_path, env)

    # Its options are typed like any built-in estimator's.
    bad = subprocess.run([sys.executable, "-m", "gvae.train", searchpath, "estimator=toy",
                          "estimator.slope=steep", *SMALL_RUN], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "estimator.slope" in bad.stdout + bad.stderr

    chosen = run(["-m", "gvae.table", "chosen", str(sweep)], tmp_path, env).stdout.split()
    run(["-m", "gvae.evaluation", *chosen, "eval.num_samples=2"], tmp_path, env)
    out = tmp_path / "results"
    run(["-m", "gvae.table", "record", str(sweep), "--out", str(out), "--num-samples", "2"], tmp_path, env)
    table = (out / "results.md").read_text()
    assert any(line.startswith("| categorical (4x4) | toy† | — |") for line in table.splitlines()), table
    assert "† beyond the paper" in table
