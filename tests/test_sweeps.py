"""Sweeps through Hydra's own launchers and sweeper (gvae[sweep]): jobs in processes, through
submitit's local executor, and a small Optuna search that reports its best trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import SYNTHETIC, gvae_train

QUICK = [o for o in SYNTHETIC if not o.startswith("train.max_steps")]
QUICK += ["train.max_steps=20", "eval.images=false"]


def jobs_of(sweep: Path) -> list[dict]:
    folders = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    return [json.loads((f / "metrics.json").read_text()) for f in folders]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "processes"])
def test_a_two_job_sweep_through_hydras_launchers_writes_each_jobs_folder(launcher, tmp_path):
    sweep = tmp_path / "sweep"
    result = gvae_train(["-m", f"hydra/launcher={launcher}", *QUICK, "seed=0,1", f"hydra.sweep.dir={sweep}"],
                        tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    jobs = jobs_of(sweep)
    assert len(jobs) == 2 and all(m["status"] == "complete" and m["step"] == 20 for m in jobs)
    assert all((sweep / str(i) / ".hydra" / "config.yaml").is_file() for i in range(2))


@pytest.mark.slow
def test_a_small_optuna_study_finishes_and_reports_its_best_trial(tmp_path):
    sweep = tmp_path / "sweep"
    result = gvae_train(["-m", "experiment=optuna_search", *QUICK, "hydra.sweeper.n_trials=3",
                         f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    jobs = jobs_of(sweep)
    assert len(jobs) == 3
    assert best.best_value == pytest.approx(min(m["val_nelbo_best"] for m in jobs))  # validation, not test
    assert {"optim.lr", "schedule.rate", "schedule.every"} <= set(best.best_params)
