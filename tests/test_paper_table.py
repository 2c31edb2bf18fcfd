"""The paper sweep and scripts/paper_table.py: a tiny real multirun, its table and figure, and the
loud failure on a sweep with a missing or failed run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf
from PIL import Image

from gvae.config import hydra_initialized, validate
from gvae.estimators import ESTIMATORS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "paper_table.py"
spec = importlib.util.spec_from_file_location("paper_table", SCRIPT)
paper_table = importlib.util.module_from_spec(spec)
sys.modules["paper_table"] = paper_table  # dataclasses look their module up by name
spec.loader.exec_module(paper_table)

# The paper sweep shrunk to 2 rows x 2 seeds: command-line keys replace the sweep's own keys.
TINY_SWEEP = [
    "experiment=paper_sweep", "model=categorical", "seed=0,1", "optim.lr=3e-3",
    "+row={estimator:gumbel_softmax,every:500,rate:1e-4},{estimator:straight_through}",
    "model.hidden=[32]", "train.max_steps=20", "train.log_every=10", "train.eval_every=10",
    "train.ckpt_every=20", "train.batch_size=50", "eval.num_samples=4", "eval.batch_size=2000",
    "eval.max_rows=4000", "eval.images=false", "device=cpu",
]


def run_table(sweep: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(sweep), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sweep(mnist_root, tmp_path_factory) -> Path:
    """A real multirun of 4 tiny jobs, started as a user would (in its own folder)."""
    work = tmp_path_factory.mktemp("sweep")
    sweep_dir = work / "multirun"
    result = subprocess.run(
        [sys.executable, "-m", "gvae.train", "-m", *TINY_SWEEP, f"hydra.sweep.dir={sweep_dir}"],
        cwd=work, env={**os.environ, "GVAE_DATA_DIR": str(mnist_root)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


@pytest.mark.slow
def test_table_has_a_row_per_estimator_with_the_paper_beside_it(sweep, tmp_path):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    assert all((j / ".hydra" / "config.yaml").is_file() and (j / "metrics.json").is_file() for j in jobs)

    result = run_table(sweep, tmp_path)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| categorical")]
    assert len(rows) == 2
    # The mean and std over the two seeds of each estimator's test bound, beside Table 1.
    paper_rows = [("straight_through", "ST", "110.9"), ("gumbel_softmax", "Gumbel-S.", "101.5")]
    for name, column, paper in paper_rows:
        bounds = [json.loads((j / "metrics.json").read_text())["test_bound"] for j in jobs
                  if OmegaConf.load(j / ".hydra" / "config.yaml").row.estimator == name]
        expected = f"{statistics.fmean(bounds):.2f} ± {statistics.stdev(bounds):.2f} | 2 |"
        start = f"| categorical (20x10) | {column} | {paper} | {expected}"
        assert any(r.startswith(start) for r in rows), rows
    assert "gvae-train -m experiment=paper_sweep" in table

    with Image.open(tmp_path / "figure.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


@pytest.mark.slow
def test_table_refuses_a_sweep_with_a_failed_run(sweep, tmp_path):
    broken = shutil.copytree(sweep, tmp_path / "sweep")
    (broken / "2" / "metrics.json").unlink()
    failed = {"status": "failed", "error": "NonFiniteError: nan"}
    (broken / "2" / "failed.json").write_text(json.dumps(failed))
    result = run_table(broken, tmp_path / "out")
    assert result.returncode == 1
    assert str(broken / "2") in result.stderr and "NonFiniteError" in result.stderr
    assert not (tmp_path / "out" / "results.md").exists()


@pytest.mark.slow
def test_table_refuses_a_sweep_with_a_missing_run(sweep, tmp_path):
    broken = shutil.copytree(sweep, tmp_path / "sweep")
    overrides = OmegaConf.load(broken / "1" / ".hydra" / "overrides.yaml")
    shutil.rmtree(broken / "1")
    (broken / "3" / "metrics.json").write_text('{"status": "running"}')  # a job that never finished
    result = run_table(broken, tmp_path / "out")
    assert result.returncode == 1
    assert "missing job" in result.stderr and all(o in result.stderr for o in overrides)
    assert str(broken / "3") in result.stderr
    assert not (tmp_path / "out" / "results.md").exists()


def _run(latent: str, estimator: str, setting: tuple[str, ...], seed: int, val: float, test: float):
    return paper_table.Run(
        folder=Path(f"{estimator}-{'-'.join(setting)}-{seed}"), setting=setting, seed=seed, latent=latent,
        estimator=estimator, config={"optim.lr": float(setting[0]), "seed": seed, "model.num_vars": 20},
        metrics={"val_nelbo_best": val, "test_bound": test},
    )


def test_selection_picks_the_best_mean_validation_setting_and_reports_its_seeds():
    latent = "categorical (20x10)"
    runs = [
        _run(latent, "muprop", ("1e-3",), 0, val=100.0, test=99.0),
        _run(latent, "muprop", ("1e-3",), 1, val=110.0, test=109.0),  # mean val 105
        _run(latent, "muprop", ("3e-4",), 0, val=103.0, test=120.0),
        _run(latent, "muprop", ("3e-4",), 1, val=104.0, test=122.0),  # mean val 103.5: chosen
    ]
    (row,) = paper_table.select(runs)
    assert row.chosen == {"optim.lr": 3e-4}
    assert [r.seed for r in row.runs] == [0, 1]
    assert row.mean("test_bound") == 121.0 and row.std("test_bound") == pytest.approx(2**0.5)


def test_paper_sweep_covers_every_estimator_and_searches_annealing_only_with_a_temperature(tmp_path):
    with hydra_initialized():
        cfg = compose("config", ["experiment=paper_sweep"], return_hydra_config=True)
        (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))
        jobs = paper_table.expected_jobs(tmp_path)
        assert len(jobs) == 2 * 3 * 3 * (4 + 3 * 4)  # latents x seeds x learning rates x rows
        rows = {o for job in jobs for o in job if o.startswith("+row=")}
        settings: dict[str, set[tuple[int, float]]] = {}
        for row in rows:
            job = compose("config", ["experiment=paper_sweep", row])
            validate(job)
            settings.setdefault(job.estimator.name, set()).add((job.schedule.every, job.schedule.rate))
    assert set(settings) == set(ESTIMATORS)
    annealed = {(500, 1e-5), (500, 1e-4), (1000, 1e-5), (1000, 1e-4)}
    for name in ("gumbel_softmax", "st_gumbel_softmax", "slope_annealed_st"):
        assert settings[name] == annealed
    for name in ("score_function", "darn", "muprop", "straight_through"):
        assert len(settings[name]) == 1
