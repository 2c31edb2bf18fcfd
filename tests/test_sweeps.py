"""Sweeps through Hydra's own launchers and sweeper (gvae[sweep]): jobs in processes, through
submitit's local executor, and a small Optuna search that reports its best trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
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


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=packed"]], ids=["basic", "packed"])
def test_a_sweep_extended_in_place_trains_only_its_new_jobs(tmp_path, launcher):
    """seed=0,1 then seed=0,1,2 in the same folder with train.resume=true: Hydra numbers the jobs
    anew (the learning rate is the outer key, so every old job but the first moves), yet each job finds
    the folder of its settings: the four old ones untouched, the two new ones trained, nothing refused."""
    sweep = tmp_path / "sweep"
    base = ["-m", *launcher, *SYNTHETIC, "train.max_steps=10", "train.eval_every=10", "train.ckpt_every=10",
            "eval.images=false", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"]
    assert gvae_train([*base, "seed=0,1"], tmp_path).returncode == 0
    before = {p.name: (p / "metrics.json").read_bytes() for p in sweep.iterdir() if p.is_dir()}
    assert len(before) == 4
    result = gvae_train([*base, "seed=0,1,2", "train.resume=true"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    folders = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(folders) == 6
    assert {p.name: (p / "metrics.json").read_bytes() for p in folders if p.name in before} == before
    settings = [frozenset(o for o in yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text())
                          if not o.startswith("train.resume")) for p in folders]
    assert len(set(settings)) == 6  # one folder per job


def test_a_jobs_folder_is_found_by_its_settings_then_by_its_run_then_made_anew(tmp_path):
    """find_job_folder's order (no training): a folder holding exactly these settings wherever it is;
    the assigned folder when free or holding the same run at another length (a sweep resumed with
    train.max_steps raised); the one other folder holding that run; else the next free number."""
    from gvae.run_folder import find_job_folder

    def job(name: str, *overrides: str) -> Path:
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
        return folder

    a, b = job("0", "seed=0", "train.max_steps=20"), job("1", "seed=1", "train.max_steps=20")
    assert find_job_folder(a, ["seed=1", "train.max_steps=20", "train.resume=true"]) == b  # moved job
    assert find_job_folder(tmp_path / "2", ["seed=2"]) == tmp_path / "2"  # free: Hydra's number
    assert find_job_folder(b, ["seed=1", "train.max_steps=50"]) == b  # the same run, trained on
    assert find_job_folder(a, ["seed=1", "train.max_steps=50", "eval.num_samples=9"]) == b
    made = find_job_folder(a, ["seed=1", "optim.lr=0.1"])  # another run: a new folder, not a or b
    assert made == tmp_path / "2" and made.is_dir()
    unknown = ["seed=0", "train.max_steps=20", "experiment=x"]  # a key gvae does not know defines a run
    assert find_job_folder(a, unknown) == tmp_path / "3"
