"""The paper sweep and gvae-table (gvae/table.py): a tiny real multirun, its table and figure, and the
loud failure on a sweep with a missing or failed run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf
from PIL import Image

from gvae import table as paper_table
from gvae.config import hydra_initialized, validate
from gvae.evaluation import main as gvae_eval
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]

# The paper sweep shrunk to 2 rows x 2 learning rates x 2 seeds: command-line keys replace the
# sweep's own keys.
M = 4  # the m of the tiny sweep's bound
TINY_SWEEP = [
    "experiment=paper_sweep", "model=categorical", "seed=0,1", "optim.lr=3e-3,1e-3",
    'hydra.sweeper.rows=["estimator=gumbel_softmax schedule.every=500 schedule.rate=1e-4",'
    '"estimator=straight_through"]',
    "model.hidden=[32]", "train.max_steps=20", "train.log_every=10", "train.eval_every=10",
    "train.ckpt_every=20", "train.batch_size=50", "eval.num_samples=4", "eval.batch_size=2000",
    "eval.max_rows=4000", "eval.images=false", "device=cpu",
]


def table(*args: str) -> subprocess.CompletedProcess:
    """`gvae-table ARGS`, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "gvae.table", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def sweep(mnist_root, tmp_path_factory) -> Path:
    """A real multirun of 8 tiny jobs (2 rows x 2 learning rates x 2 seeds), started as a user
    would, and the chosen settings' runs evaluated by gvae-eval, as the README says."""
    work = tmp_path_factory.mktemp("sweep")
    sweep_dir = work / "multirun"
    env = {**os.environ, "GVAE_DATA_DIR": str(mnist_root)}
    result = subprocess.run(
        [sys.executable, "-m", "gvae.train", "-m", *TINY_SWEEP, f"hydra.sweep.dir={sweep_dir}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = table("chosen", str(sweep_dir))
    assert chosen.returncode == 0, chosen.stderr
    folders = chosen.stdout.split()
    assert len(folders) == 4  # 2 rows x 2 seeds
    result = subprocess.run([sys.executable, "-m", "gvae.evaluation", *folders, f"eval.num_samples={M}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def job_config(job: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml"), resolve=True)


@pytest.mark.slow
def test_table_reports_both_test_figures_of_the_setting_chosen_on_validation(sweep, tmp_path):
    result = table("record", str(sweep), "--out", str(tmp_path), "--num-samples", str(M))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "results.md").read_text()
    rows = [r for r in text.splitlines() if r.startswith("| categorical (20x10) |") and " ± " in r]
    assert len(rows) == 2
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    paper_cells = [("straight_through", "ST", "110.9"), ("gumbel_softmax", "Gumbel-S.", "101.5")]
    for name, column, paper in paper_cells:
        mine = [j for j in jobs if job_config(j)["estimator"]["name"] == name]
        by_lr: dict[float, list[Path]] = {}
        for j in mine:
            by_lr.setdefault(job_config(j)["optim"]["lr"], []).append(j)
        val = {lr: statistics.fmean(json.loads((j / "metrics.json").read_text())["val_nelbo"] for j in js)
               for lr, js in by_lr.items()}
        best = min(val, key=val.get)
        # Only the chosen setting's runs were given an m-sample evaluation, and they are reported.
        assert all((j / "eval.json").is_file() == (lr == best) for lr, js in by_lr.items() for j in js)
        evals = [json.loads((j / "eval.json").read_text()) for j in by_lr[best]]
        nelbo = [e["test_nelbo"] for e in evals]
        bound = [e["test_bound"] for e in evals]
        literal = [e["test_literal_bound"] for e in evals]
        expected = (f"| categorical (20x10) | {column} | 1 | {paper} | "  # 1 decoder pass a step
                    f"{statistics.fmean(nelbo):.2f} ± {statistics.stdev(nelbo):.2f} | "
                    f"{statistics.fmean(bound):.2f} ± {statistics.stdev(bound):.2f} | "
                    f"{statistics.fmean(literal):.2f} ± {statistics.stdev(literal):.2f} | 2 | "
                    f"{val[best]:.2f} ± ")
        assert any(r.startswith(expected) for r in rows), (expected, rows)
        assert f"optim.lr={best}" in next(r for r in rows if f"| {column} |" in r)
    # the command names the sweep's shape given on its command line (here the rows), so it reproduces it
    command = next(line for line in text.splitlines() if line.startswith("Sweeps: "))
    assert "`gvae-train -m 'hydra.sweeper.rows=[" in command and " experiment=paper_sweep " in command
    assert f"test bound (m={M})" in text
    with Image.open(tmp_path / "figure.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200

    # The record alone regenerates the same results.md.
    first = text
    (tmp_path / "results.md").unlink()
    assert table("render", str(tmp_path)).returncode == 0
    assert (tmp_path / "results.md").read_text() == first


@pytest.mark.slow
def test_a_failed_run_is_shown_and_its_setting_is_not_chosen(sweep, tmp_path):
    broken = shutil.copytree(sweep, tmp_path / "sweep")
    chosen_st = [j for j in sorted(broken.iterdir()) if j.is_dir() and (j / "eval.json").is_file()
                 and job_config(j)["estimator"]["name"] == "straight_through"]
    victim = chosen_st[0]
    (victim / "metrics.json").unlink()
    (victim / "failed.json").write_text(json.dumps({"status": "failed", "error": "NonFiniteError: nan"}))
    # The other learning rate is now chosen: its runs need the bound (the others are skipped as done).
    assert gvae_eval([*table("chosen", str(broken)).stdout.split(), f"eval.num_samples={M}"]) == 0
    result = table("record", str(broken), "--out", str(tmp_path / "out"), "--num-samples", str(M))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out" / "results.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| categorical (20x10) | ST |"))
    lr = job_config(victim)["optim"]["lr"]
    assert f"optim.lr={lr} (1 of 2 seeds)" in row  # shown as failed
    assert f"| optim.lr={lr} |" not in row  # and not chosen
    assert "failed: NonFiniteError: nan" in text


@pytest.mark.slow
def test_table_refuses_missing_or_unfinished_jobs_and_runs_without_the_bound(sweep, tmp_path):
    broken = shutil.copytree(sweep, tmp_path / "sweep")
    overrides = OmegaConf.load(broken / "1" / ".hydra" / "overrides.yaml")
    shutil.rmtree(broken / "1")
    (broken / "3" / "metrics.json").write_text('{"status": "running"}')  # a job that never finished
    result = table("record", str(broken), "--out", str(tmp_path / "out"), "--num-samples", str(M))
    assert result.returncode == 1
    assert "(not started)" in result.stderr and all(o in result.stderr for o in overrides)
    assert f"{broken.name}/3 " in result.stderr and "unfinished" in result.stderr
    assert (tmp_path / "out" / "jobs.json").is_file()  # the partial record is kept, for resuming
    assert not (tmp_path / "out" / "results.md").exists()

    # Asking for another m than the chosen runs were evaluated with: their folders are named.
    result = table("record", str(sweep), "--out", str(tmp_path / "m1000"), "--num-samples", "1000")
    assert result.returncode == 1 and "run gvae-eval eval.num_samples=1000" in result.stderr
    assert not (tmp_path / "m1000" / "results.md").exists()


def _job(estimator: str, lr: float, seed: int, val: float, test: float | None) -> dict:
    metrics = {"val_nelbo": val, "val_nelbo_best": val, "step": 10, "wall_seconds": 1.0, "device_name": "cpu"}
    return {
        "job": f"s/{estimator}-{lr}-{seed}", "latent": "categorical (20x10)", "estimator": estimator,
        "seed": seed, "setting": [f"optim.lr={lr}", f"estimator={estimator}"],
        "config": {"estimator.name": estimator, "optim.lr": lr, "seed": seed},
        "status": "complete", "error": None,
        "metrics": metrics, "val_curve": [[10, val]],
        "eval": None if test is None else {"test_nelbo": test + 1, "test_bound": test, "num_samples": 1000,
                                           "wall_seconds": 1.0},
    }


def test_selection_uses_validation_only_and_never_reads_other_settings_test_figures(tmp_path):
    jobs = [
        _job("muprop", 1e-3, 0, val=100.0, test=None),
        _job("muprop", 1e-3, 1, val=110.0, test=None),  # mean val 105: not chosen, never evaluated
        _job("muprop", 3e-4, 0, val=103.0, test=120.0),
        _job("muprop", 3e-4, 1, val=104.0, test=122.0),  # mean val 103.5: chosen
    ]
    sweeps = [{"name": "s", "command": "c", "jobs": 4}]
    record = {"title": "T", "num_samples": 1000, "sweeps": sweeps, "jobs": jobs}
    (tmp_path / "jobs.json").write_text(json.dumps(record))
    (cell,) = paper_table.select(record)
    assert cell.label(cell.chosen) == "optim.lr=0.0003" and [j["seed"] for j in cell.runs] == [0, 1]
    text = paper_table.render(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| categorical (20x10) | MuProp |"))
    assert row.startswith("| categorical (20x10) | MuProp | 2 |")  # MuProp's two decoder passes a step
    assert ("| 107.0 | 122.00 ± 1.41 | 121.00 ± 1.41 | not measured | 2 | 103.50 ± 0.71 | — | 10 | "
            "optim.lr=0.0003 |") in row


COMMITTED = sorted((ROOT / "docs" / "results").glob("**/jobs.json"))


@pytest.mark.parametrize("record", COMMITTED,
                         ids=[p.parent.relative_to(ROOT / "docs" / "results").as_posix() for p in COMMITTED])
def test_committed_results_regenerate_byte_for_byte_from_their_records(record, tmp_path):
    out = tmp_path / record.parent.name
    shutil.copytree(record.parent, out)
    jobs = json.loads(record.read_text())["jobs"]
    if any(j["status"] not in paper_table.FINAL for j in jobs):
        # A record committed while its sweeps still run: no table may be drawn from it, and none is.
        assert not (record.parent / "results.md").exists()
        assert table("render", str(out)).returncode == 1
        return
    (out / "results.md").unlink()
    assert table("render", str(out)).returncode == 0
    assert (out / "results.md").read_bytes() == (record.parent / "results.md").read_bytes()


def test_the_anchors_comparison_regenerates_and_leaves_out_a_partial_record(tmp_path):
    """scripts/anchors.py: the committed comparison is what the committed records give, byte for byte;
    a record whose sweep has an unfinished job gives none of its rows, and says so."""
    committed = ROOT / "docs" / "results" / "bernoulli200_anchors" / "comparison.md"
    run = [sys.executable, str(ROOT / "scripts" / "anchors.py")]
    assert subprocess.run([*run, "--out", str(tmp_path / "now")], capture_output=True).returncode == 0
    assert (tmp_path / "now" / "comparison.md").read_bytes() == committed.read_bytes()

    results = tmp_path / "results"
    record = json.loads((ROOT / "docs" / "results" / "cpu_table" / "jobs.json").read_text())
    (results / "cpu_table").mkdir(parents=True)
    record["jobs"][0] = dict(record["jobs"][0], status="unfinished")
    (results / "cpu_table" / "jobs.json").write_text(json.dumps(record))
    result = subprocess.run([*run, "--out", str(tmp_path / "partial"), "--results", str(results)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "partial" / "comparison.md").read_text()
    assert f"docs/results/cpu_table (1 of its {len(record['jobs'])} jobs not finished)" in text
    assert "| gumbel_softmax |" not in text and "not measured" in text


def test_the_cpu_table_is_committed():
    assert (ROOT / "docs" / "results" / "cpu_table" / "jobs.json").is_file()


def test_paper_sweep_launches_the_papers_288_jobs_with_annealing_only_where_there_is_a_temperature(tmp_path):
    with hydra_initialized():
        cfg = compose("config", ["experiment=paper_sweep"], return_hydra_config=True)
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))
    jobs = paper_table.expected_jobs(tmp_path)
    assert len(jobs) == len(set(jobs)) == 2 * 3 * 3 * (4 + 3 * 4)  # latents x seeds x learning rates x rows
    estimators = {o.split("=")[1] for job in jobs for o in job if o.startswith("estimator=")}
    assert estimators == set(paper_table.COLUMNS)  # the paper's seven, whatever else is registered
    rows = {frozenset(o for o in job if not o.startswith(("seed=", "optim.lr=", "model="))) for job in jobs}
    assert len(rows) == 16
    for job in rows:
        cfg = validate(compose_config(sorted(job)))
        tempered = cfg.estimator.name in ("gumbel_softmax", "st_gumbel_softmax", "slope_annealed_st")
        assert any(o.startswith("schedule.") for o in job) == tempered


def test_an_experiment_whose_rows_set_an_inherited_swept_key_launches_each_job_once(tmp_path):
    # cpu_table_beyond inherits cpu_table's model and estimator lists, which its rows replace: the
    # rows sweeper must launch each distinct job once, not once per replaced value (280 here).
    with hydra_initialized():
        cfg = compose("config", ["experiment=cpu_table_beyond", "seed=0"], return_hydra_config=True)
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))
    jobs = paper_table.expected_jobs(tmp_path)
    assert len(jobs) == len(set(jobs)) == 2 * 10  # learning rates x rows


@pytest.mark.slow
def test_table_refuses_a_job_whose_recorded_config_no_longer_matches_its_results(sweep, tmp_path):
    broken = shutil.copytree(sweep, tmp_path / "sweep")
    record = broken / "2" / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(record)
    cfg.optim.lr = 0.123  # the record rewritten after training, as an old gvae's refused resume did
    OmegaConf.save(cfg, record)
    result = table("record", str(broken), "--out", str(tmp_path / "out"), "--num-samples", str(M))
    assert result.returncode == 1
    assert f"job {broken / '2'}" in result.stderr and "disagree" in result.stderr
    assert "optim.lr:" in result.stderr and "0.123 now" in result.stderr
    assert not (tmp_path / "out" / "results.md").exists()


@pytest.mark.slow
def test_jobs_read_in_processes_give_the_record_read_in_this_one_and_the_same_refusal(sweep, tmp_path):
    """A large table's jobs are read in several processes (gvae.table.job_records): the record is the
    one read here, job for job, and a job that fails its check is refused as it is here."""
    from gvae.table import TableError, read_sweeps

    assert read_sweeps([sweep], workers=2) == read_sweeps([sweep], workers=1)
    broken = shutil.copytree(sweep, tmp_path / "sweep")
    record = broken / "5" / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(record)
    cfg.optim.lr = 0.123
    OmegaConf.save(cfg, record)
    messages = []
    for workers in (1, 2):
        with pytest.raises(TableError) as refused:
            read_sweeps([broken], workers=workers)
        messages.append(str(refused.value))
    assert messages[0] == messages[1] and f"job {broken / '5'}" in messages[0] and "0.123 now" in messages[0]


@pytest.mark.slow
def test_a_sweep_relaunched_with_another_cadence_still_finds_its_finished_jobs(sweep, tmp_path):
    """A sweep resumed with a non-defining key changed (train.ckpt_every: its finished jobs keep the
    overrides they were launched with, multirun.yaml has the new command) is the same sweep: every
    job found, none missing; a defining key changed (optim.momentum) makes other jobs."""
    from gvae.table import read_sweeps

    before = read_sweeps([sweep])
    for extra, missing in (("train.ckpt_every=7", 0), ("optim.momentum=0.5", 8)):
        relaunched = shutil.copytree(sweep, tmp_path / extra)
        multirun = OmegaConf.load(relaunched / "multirun.yaml")
        multirun.hydra.overrides.task.append(extra)
        OmegaConf.save(multirun, relaunched / "multirun.yaml")
        jobs = read_sweeps([relaunched])["jobs"]
        assert sum(job["status"] == "missing" for job in jobs) == missing, extra
        found = [job for job in jobs if job["status"] != "missing"]
        assert [(j["job"].split("/")[1], j["metrics"]) for j in found] == [
            (j["job"].split("/")[1], j["metrics"]) for j in before["jobs"]]


def test_how_often_a_run_checkpoints_is_no_part_of_its_setting_and_how_often_it_evaluates_is():
    """A resumed run ends as the straight run ends, whatever its checkpoints' spacing, so seeds
    checkpointed at different steps share a setting; the validation curve's points do not."""
    from gvae.config import Config
    from gvae.table import in_setting

    assert not in_setting("train.ckpt_every=1000", Config())
    assert in_setting("train.eval_every=1000", Config()) and in_setting("optim.lr=0.003", Config())


def test_a_curve_is_flat_from_the_step_after_which_it_stays_within_a_nat_of_its_end():
    curve = [(1000, 150.0), (2000, 120.0), (3000, 110.8), (4000, 110.2), (5000, 110.0)]
    assert paper_table.flat_from(curve) == 3000
    assert paper_table.flat_from([(1000, 130.0), (2000, 120.0)]) == 2000  # still falling at the end
    falling = [(s, 200.0 - s / 1000) for s in range(1000, 21000, 1000)]  # 10 nats per 10,000 steps
    assert paper_table.late_slope(falling) == pytest.approx(-10.0)


def _distance_row(curve: list[tuple[int, float]], test_nelbo: float, test_bound: float) -> str:
    """The Distance-to-the-paper row of one categorical MuProp cell (paper 107.0) with these figures."""
    job = _job("muprop", 1e-3, 0, val=curve[-1][1], test=test_bound)
    job["val_curve"], job["eval"]["test_nelbo"] = [list(p) for p in curve], test_nelbo
    (cell,) = paper_table.select({"title": "T", "num_samples": 1000, "jobs": [job],
                                  "sweeps": [{"name": "s", "command": "c", "jobs": 1}]})
    lines = paper_table.distance_to_paper([cell], {id(cell): [job["eval"]]}, 1000)
    return next(line for line in lines if line.startswith("| categorical (20x10) | MuProp |"))


def test_a_cell_is_within_2_nats_only_on_the_judged_reading_and_otherwise_says_what_its_curve_shows():
    falling = [(s, 200.0 - s / 1000) for s in range(1000, 41000, 1000)]  # -10 nats per 10,000 steps
    flat = [(1000, 150.0), (2000, 120.0), *((s, 120.0) for s in range(3000, 41000, 1000))]
    # the -ELBO within 2 of the paper does not make the cell close: the bound is the judged reading
    row = _distance_row(falling, test_nelbo=108.0, test_bound=100.0)
    assert "| +1.00 | -7.00 |" in row
    assert row.endswith("| **no** | below the paper; still falling at 40000: -10.00 per 10k |")
    row = _distance_row(falling, test_nelbo=120.0, test_bound=108.5)
    assert "| +1.50 |" in row and row.endswith("| yes | — |")
    row = _distance_row(falling, test_nelbo=125.0, test_bound=112.0)
    assert row.endswith("| **no** | still falling at 40000: -10.00 per 10k |")
    row = _distance_row(flat, test_nelbo=125.0, test_bound=112.0)
    assert row.endswith("| **no** | flat from 2000 (+0.00 per 10k): not the budget |")


def test_the_network_study_regenerates_byte_for_byte_from_the_records_it_names(tmp_path):
    study = ROOT / "docs" / "results" / "network_study" / "study.md"
    header = next(line for line in study.read_text().splitlines() if line.startswith("Generated by"))
    sources = [s.removesuffix("/jobs.json") for s in header.split("`")[3::2] if s.endswith("/jobs.json")]
    assert len(sources) >= 2  # at least the paper's literal network and the notebook's MLP
    shutil.copy(study.parent / "notes.md", tmp_path / "notes.md")  # the discussion, by hand
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "network_study.py"), *sources, "--out",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "study.md").read_bytes() == study.read_bytes()


@pytest.mark.slow
def test_a_table_refuses_test_figures_of_an_earlier_state_than_its_selection(tmp_path):
    """gvae-eval at step 20, then the run resumed to step 40: the record would set step 20's test
    figures beside step 40's validation figures; it stops naming the file, the steps and the command."""
    from tests.conftest import SYNTHETIC, gvae_train

    run = tmp_path / "sweep" / "0"
    args = [*SYNTHETIC, "train.max_steps=20", f"hydra.run.dir={run}"]
    assert gvae_train(args, tmp_path).returncode == 0
    assert gvae_eval([str(run), "eval.num_samples=2"]) == 0
    assert gvae_train([*args, "train.max_steps=40", "train.resume=true"], tmp_path).returncode == 0
    stale = r"eval.json is of step 20 .*\(step 40, .*gvae-eval --force"
    with pytest.raises(paper_table.TableError, match=stale):
        paper_table.job_record(run, "sweep", run.parent)
    assert gvae_eval([str(run), "eval.num_samples=2"]) == 0  # a new state: evaluated again, not skipped
    assert paper_table.job_record(run, "sweep", run.parent)["eval"]["step"] == 40


@pytest.mark.slow
@pytest.mark.parametrize("damage", [": [unclosed", "estimator:\n  name: no_such_estimator\n"])
def test_a_damaged_hydra_record_is_named_not_a_traceback(tiny_sweep, tmp_path, damage):
    sweep = shutil.copytree(tiny_sweep, tmp_path / "sweep")
    (sweep / "0" / ".hydra" / "config.yaml").write_text(damage)
    with pytest.raises(paper_table.TableError, match=r"job .*0: .*config.yaml"):
        paper_table.job_record(sweep / "0", "sweep", sweep)
    command = [sys.executable, "-m", "gvae.table", "record", str(sweep), "--out", str(tmp_path / "o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "config.yaml" in result.stderr


def test_a_run_training_again_is_running_not_the_failure_it_resumed_from(tmp_path):
    """A folder whose holder record names a live process on this machine is "running", though the
    failed.json of the interruption it resumed from is still there; once that process is gone, the
    failed.json says what the folder holds."""
    from gvae.runs import run_status

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "failed.json").write_text(json.dumps({"status": "interrupted", "error": "SIGTERM at step 5"}))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        holder = {"pid": sleeper.pid, "host": host, "started": "now", "command": ["gvae-train"]}
        (folder / "running.json").write_text(json.dumps(holder))
        holder_named = f"training now (process {sleeper.pid} on {host}, started now: gvae-train)"
        assert run_status(folder) == ("running", holder_named)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_status(folder) == ("interrupted", "SIGTERM at step 5")
    (folder / "running.json").write_text(json.dumps({**holder, "host": "another-machine"}))
    assert run_status(folder)[0] == "interrupted"  # a process elsewhere cannot be seen from here
