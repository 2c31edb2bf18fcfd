"""scripts/budget_study.py: each cell's chosen run continued past the halving's last rung in a copy,
equal to a straight run of that length, the sweep left untouched; its record regenerates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import SYNTHETIC, gvae_train
from .test_halving import HALVING, folder_state

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "budget_study.py"
sys.path.insert(0, str(ROOT / "scripts"))
from compare_runs import differences  # noqa: E402


def budget(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_chosen_runs_continue_in_copies_like_straight_runs_and_the_record_regenerates(tmp_path):
    sweep = tmp_path / "sweep"
    result = gvae_train(["-m", *SYNTHETIC, "train.eval_every=20", "eval.images=false", *HALVING,
                         f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    choices = json.loads((sweep / "halving.json").read_text())["choices"]
    first = sweep / str(choices["estimator=gumbel_softmax"])
    result = subprocess.run([sys.executable, "-m", "gvae.evaluation", str(first), "eval.num_samples=4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    before = folder_state(sweep)

    runs = tmp_path / "budget"
    result = budget("run", str(sweep), "--steps", "60", "--runs", str(runs), "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert folder_state(sweep) == before  # the sweep's own runs are not touched
    copies = {p.parent.parent for p in runs.glob("*/*/.hydra/config.yaml")}
    assert {c.name for c in copies} == {str(n) for n in choices.values()}
    for copy in copies:
        curve = json.loads((copy / "metrics.json").read_text())["val_curve"]
        assert [s for s, _ in curve] == [20, 40, 60]  # the whole run's curve, from the start
    copy = runs / "sweep" / first.name
    assert json.loads((copy / "rung_eval.json").read_text())["step"] == 40
    assert not (copy / "eval.json").exists()

    # The continued copy is the run trained straight to 60 steps.
    overrides = [o for o in yaml.safe_load((first / ".hydra" / "overrides.yaml").read_text())
                 if not o.startswith(("train.max_steps=", "train.resume="))]
    straight = tmp_path / "straight"
    result = gvae_train([*overrides, "train.max_steps=60", f"hydra.run.dir={straight}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert differences(copy, straight) == []

    state = folder_state(runs)
    assert budget("run", str(sweep), "--steps", "60", "--runs", str(runs), cwd=tmp_path).returncode == 0
    assert folder_state(runs) == state  # a rerun finds every copy finished

    out = tmp_path / "record"
    result = budget("record", str(runs), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (out / "budget.md").read_text()
    row = next(line for line in text.splitlines() if "| Gumbel-S. |" in line)
    assert "| 60 |" in row and "not measured" in row  # evaluated at the rung only
    (out / "budget.md").unlink()
    assert budget("render", str(out), cwd=tmp_path).returncode == 0
    assert (out / "budget.md").read_text() == text

    # Without the sweep's folders, its table record names the same runs: trained from step 0 to the
    # rung, evaluated there with the record's m, continued: the same figures and the straight run.
    table = tmp_path / "table"
    result = subprocess.run([sys.executable, "-m", "gvae.table", "record", str(sweep), "--out", str(table),
                             "--num-samples", "4"],
                            capture_output=True, text=True, timeout=300)
    # the record is written; rendering it wants every cell's chosen runs evaluated, here only one
    assert (table / "jobs.json").is_file(), result.stderr[-3000:]
    again = tmp_path / "again"
    result = budget("run", "sweep", "--record", str(table / "jobs.json"), "--steps", "60",
                    "--runs", str(again), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    retrained = again / "sweep" / first.name
    figures = ("step", "num_samples", "test_nelbo", "test_bound", "test_literal_bound")
    rung = [json.loads((folder / "rung_eval.json").read_text()) for folder in (retrained, copy)]
    assert [{k: e[k] for k in figures} for e in rung] == [{k: rung[1][k] for k in figures}] * 2
    assert differences(retrained, straight) == []
    assert budget("run", "nosuch", "--record", str(table / "jobs.json"), "--steps", "60", "--runs",
                  str(again), cwd=tmp_path).returncode == 1

    # `record --keep` adds to a record: an earlier run the folders lack stays, theirs are replaced.
    data = json.loads((out / "curves.json").read_text())
    earlier = {**data["runs"][0], "job": "earlier/1"}
    (out / "curves.json").write_text(json.dumps({"runs": [earlier, *data["runs"]]}))
    assert budget("record", str(again), "--out", str(out), "--keep", cwd=tmp_path).returncode == 0
    assert [r["job"] for r in json.loads((out / "curves.json").read_text())["runs"]] == \
        ["earlier/1", *(r["job"] for r in data["runs"])]
    metrics = retrained / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "status": "running"}))
    result = budget("record", str(again), "--out", str(out), "--keep", cwd=tmp_path)
    assert result.returncode == 0 and "not finished, left out" in result.stderr
    assert [r["job"] for r in json.loads((out / "curves.json").read_text())["runs"]] == \
        ["earlier/1", *(r["job"] for r in data["runs"])]  # the unfinished run's earlier record stays
    assert budget("record", str(again), "--out", str(out), cwd=tmp_path).returncode == 1  # without --keep
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "status": "complete"}))
    assert budget("record", str(again), "--out", str(out), cwd=tmp_path).returncode == 0
    assert "earlier/1" not in (out / "curves.json").read_text()


COMMITTED = ROOT / "docs" / "results" / "table1_budget"


@pytest.mark.skipif(not (COMMITTED / "curves.json").is_file(), reason="no committed budget record yet")
def test_the_committed_budget_study_regenerates_byte_for_byte(tmp_path):
    for f in ("curves.json", "notes.md"):
        if (COMMITTED / f).is_file():
            (tmp_path / f).write_bytes((COMMITTED / f).read_bytes())
    assert budget("render", str(tmp_path), cwd=ROOT).returncode == 0
    assert (tmp_path / "budget.md").read_text() == (COMMITTED / "budget.md").read_text()
    assert (tmp_path / "figure.png").read_bytes() == (COMMITTED / "figure.png").read_bytes()
