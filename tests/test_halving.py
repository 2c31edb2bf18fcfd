"""Successive halving (gvae/halving.py, hydra/sweeper=rows with `halving`): its decisions on the
validation figure alone, and survivors that continue by resuming exactly as a straight run would."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gvae import table
from gvae.errors import ConfigError
from gvae.halving import HalvingConfig, cells, decide, kept, value_at

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from compare_runs import differences  # noqa: E402

from .conftest import SYNTHETIC, gvae_train  # noqa: E402


def test_each_rung_keeps_the_best_third_and_the_last_keeps_one():
    scores = {"a": [5.0, 4.0, 3.0], "b": [1.0, 9.0, 9.0], "c": [2.0, 1.0, 2.5], "d": [3.0, 2.0, 1.0],
              "e": [4.0, 3.0, 0.5], "f": [6.0, 0.0, 0.0]}
    rungs = decide(list(scores), lambda s, steps: scores[s][steps // 10 - 1], [10, 20, 30], eta=3)
    assert [r.survivors for r in rungs] == [["b", "c"], ["c"], ["c"]]
    assert rungs[0].scores == {s: v[0] for s, v in scores.items()}  # every setting scored at rung 1
    assert set(rungs[1].scores) == {"b", "c"}  # only survivors at the next
    # f would have won at step 20 and e at step 30: halving decides at each rung on what it has.
    assert [kept(n, 3) for n in (1, 2, 3, 4, 6, 24)] == [1, 1, 1, 2, 2, 8]
    # min_kept: at least two go on to every rung but the last, which still chooses one.
    rungs = decide(list(scores), lambda s, steps: scores[s][steps // 10 - 1], [10, 20, 30], eta=3, min_kept=2)
    assert [r.survivors for r in rungs] == [["b", "c"], ["c", "b"], ["c"]]
    assert [kept(n, 3, 2) for n in (1, 2, 3, 6, 24)] == [1, 2, 2, 2, 8]


def test_a_run_without_a_figure_at_the_rung_is_out_and_ties_go_to_the_earlier_setting():
    curves = {"x": [[10, 2.0]], "y": [[10, math.nan]], "z": [], "w": [[10, 2.0]]}
    (rung,) = decide(list(curves), lambda s, steps: value_at(curves[s], steps), [10], eta=2)
    assert rung.survivors == ["x"]
    assert rung.scores["y"] == rung.scores["z"] == math.inf
    assert value_at([[10, 1.0], [20, 0.5]], 20) == 0.5 and value_at(None, 20) == math.inf


def test_cells_group_jobs_by_the_cell_keys():
    jobs = {0: ["estimator=a", "optim.lr=1"], 1: ["estimator=b", "optim.lr=1"],
            2: ["estimator=a", "optim.lr=2"]}
    assert cells(jobs, ["estimator", "model"]) == {("estimator=a", "model=(default)"): [0, 2],
                                                   ("estimator=b", "model=(default)"): [1]}


@pytest.mark.parametrize("bad", [{"rungs": [20, 10]}, {"rungs": [0, 10]}, {"rungs": [10], "eta": 1},
                                 {"rungs": [10], "min_kept": 0}])
def test_bad_halving_settings_name_the_key(bad):
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.halving\.(rungs|eta|min_kept)"):
        HalvingConfig(**bad).check()


HALVING = ["hydra/sweeper=rows", "optim.lr=1e-4,3e-3,1e-2", "estimator=gumbel_softmax,straight_through",
           "hydra.sweeper.halving.rungs=[20,40]", "hydra.sweeper.halving.eta=2",
           "hydra.sweeper.halving.cell=[estimator]", "hydra.sweeper.halving.seeds=[1]"]


def curves(sweep: Path) -> dict[int, list]:
    return {int(d.name): json.loads((d / "metrics.json").read_text())["val_curve"]
            for d in sweep.iterdir() if (d / "metrics.json").is_file()}


def folder_state(sweep: Path) -> dict[str, bytes]:
    return {str(p.relative_to(sweep)): p.read_bytes() for p in sorted(sweep.rglob("*"))
            if p.is_file() and p.suffix in {".json", ".pt"}}


def test_a_halving_sweep_decides_on_validation_resumes_survivors_exactly_and_reruns_as_a_no_op(tmp_path):
    sweep = tmp_path / "sweep"
    result = gvae_train(["-m", *SYNTHETIC, "train.eval_every=20", "eval.images=false", *HALVING,
                         f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    record = json.loads((sweep / "halving.json").read_text())
    found = curves(sweep)
    assert sorted(found) == list(range(8))  # 6 grid jobs, then one more seed of each cell's choice
    assert [r["steps"] for r in record["rungs"]] == [20, 40, 40]
    for cell, rungs in record["cells"].items():
        first, last = rungs
        # Rung 1: the best ceil(3 / 2) = 2 by the validation figure at step 20; rung 2: the best one.
        by_val = sorted(first["scores"], key=lambda n: value_at(found[int(n)], 20))
        assert first["survivors"] == [int(n) for n in by_val[:2]]
        assert last["survivors"] == [min(first["survivors"], key=lambda n: value_at(found[n], 40))]
        assert record["choices"][cell] == last["survivors"][0]
        out = (set(map(int, first["scores"])) - set(first["survivors"]))
        assert all(found[n][-1][0] == 20 for n in out)  # the eliminated stopped at the first rung
        assert all(found[n][-1][0] == 40 for n in first["survivors"])
    seeds = record["seed_jobs"]
    assert sorted(map(int, seeds)) == [6, 7] and all("seed=1" in o for o in seeds.values())

    # A survivor trained 20 steps, then resumed to 40, is the run trained straight to 40.
    choice = record["choices"]["estimator=gumbel_softmax"]
    overrides = [o for o in yaml.safe_load((sweep / str(choice) / ".hydra" / "overrides.yaml").read_text())
                 if not o.startswith(("train.max_steps=", "train.resume="))]
    straight = tmp_path / "straight"
    result = gvae_train([*SYNTHETIC, "train.eval_every=20", "eval.images=false", *overrides, "seed=0",
                         "train.max_steps=40", f"hydra.run.dir={straight}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert differences(sweep / str(choice), straight) == []

    # gvae-table: the halving's choices, their seeds evaluated, then the record and its table.
    chosen = subprocess.run([sys.executable, "-m", "gvae.table", "chosen", str(sweep)],
                            capture_output=True, text=True, timeout=300)
    assert chosen.returncode == 0, chosen.stderr
    expected = {str(sweep / str(n)) for n in [*record["choices"].values(), *map(int, seeds)]}
    assert set(chosen.stdout.split()) == expected
    result = subprocess.run([sys.executable, "-m", "gvae.evaluation", *sorted(expected),
                             "eval.num_samples=4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "table"
    result = subprocess.run([sys.executable, "-m", "gvae.table", "record", str(sweep), "--out", str(out),
                             "--num-samples", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert "## Successive halving" in text and "3 at 20 → 2 at 40" in text
    for cell, n in record["choices"].items():
        overrides_file = (sweep / str(n) / ".hydra" / "overrides.yaml").read_text()
        lr = next(o for o in overrides_file.split() if "optim.lr" in o)
        row = next(r for r in text.splitlines() if r.startswith("| categorical (4x4) |") and "±" in r
                   and ("Gumbel-S." if "gumbel" in cell else "| ST |") in r)
        assert f"optim.lr={lr.split('=')[1]}" in row and "| 2 |" in row  # two seeds of the choice
    (out / "results.md").unlink()
    assert subprocess.run([sys.executable, "-m", "gvae.table", "render", str(out)]).returncode == 0
    assert (out / "results.md").read_text() == text
    # Without a seed job of a choice, no table.
    partial = tmp_path / "partial"
    shutil.copytree(sweep, partial)
    shutil.rmtree(partial / "7")
    result = subprocess.run([sys.executable, "-m", "gvae.table", "record", str(partial), "--out",
                             str(tmp_path / "partial_table"), "--num-samples", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "missing" in result.stderr
    assert not (tmp_path / "partial_table" / "results.md").exists()

    # The same command again: every job found finished at its rung, nothing trained or rewritten.
    before = folder_state(sweep)
    again = gvae_train(["-m", *SYNTHETIC, "train.eval_every=20", "eval.images=false", *HALVING,
                        f"hydra.sweep.dir={sweep}"], tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert json.loads((sweep / "halving.json").read_text()) == record
    assert folder_state(sweep) == before


def fake_job(name: str, setting: list[str], steps: int, curve: list, seed: int = 0) -> dict:
    return {"job": f"sweep/{name}", "setting": setting, "seed": seed, "status": "complete", "error": None,
            "metrics": {"step": steps}, "val_curve": curve}


def test_the_table_marks_a_survivor_not_yet_at_its_next_rung_and_asks_for_the_choices_seeds():
    halving = HalvingConfig(rungs=[10, 20], eta=2, cell=["estimator"], seeds=[1])
    grid = [frozenset(["estimator=a", f"optim.lr={lr}"]) for lr in (1, 2, 3)]
    records = {
        grid[0]: fake_job("0", ["estimator=a", "optim.lr=1"], 10, [[10, 5.0]]),
        grid[1]: fake_job("1", ["estimator=a", "optim.lr=2"], 10, [[10, 3.0]]),  # best: must go on
        grid[2]: fake_job("2", ["estimator=a", "optim.lr=3"], 10, [[10, 4.0]]),
    }

    def missing(job, why="no job folder"):
        return {"job": "sweep/(not started)", "overrides": sorted(job), "status": "missing", "error": why}

    jobs = table.halving_jobs(grid, {k: dict(v) for k, v in records.items()}, halving, missing)
    assert [j["status"] for j in jobs] == ["complete", "unfinished", "unfinished"]  # 2 of 3 go on
    assert "20 steps" in jobs[1]["error"]
    # Trained on: job 2 won at step 20, so its seed 1 is expected, and missing until it runs.
    records[grid[1]].update(metrics={"step": 20}, val_curve=[[10, 3.0], [20, 2.5]])
    records[grid[2]].update(metrics={"step": 20}, val_curve=[[10, 4.0], [20, 2.0]])
    jobs = table.halving_jobs(grid, records, halving, missing)
    assert [j["status"] for j in jobs] == ["complete", "complete", "complete", "missing"]
    assert jobs[-1]["overrides"] == ["estimator=a", "optim.lr=3", "seed=1"]


def test_table1_sbn_searches_the_papers_grid_by_halving_with_annealing_only_for_annealed_st(tmp_path):
    from hydra import compose
    from omegaconf import OmegaConf

    from gvae.config import hydra_initialized, validate
    from tests.conftest import compose_config

    with hydra_initialized():
        cfg = compose("config", ["experiment=table1_sbn", "model=bernoulli"], return_hydra_config=True)
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))
    grid = table.expected_jobs(tmp_path)
    assert len(grid) == len(set(grid)) == 6 * (6 + 4)  # the paper's six learning rates x rows
    halving = table.halving_of(tmp_path)
    assert halving.rungs[-1] == 40_000 and halving.seeds == [1, 2] and halving.min_kept == 2
    lrs = {o for job in grid for o in job if o.startswith("optim.lr=")}
    assert {float(o.split("=")[1]) for o in lrs} == {3e-5, 1e-5, 3e-4, 1e-4, 3e-3, 1e-3}
    for job in {frozenset(o for o in job if not o.startswith("optim.lr=")) for job in grid}:
        typed = validate(compose_config(["experiment=table1_sbn", "model=bernoulli", *sorted(job)]))
        assert typed.task.name == "sbn" and typed.model.hidden == [] and typed.optim.momentum == 0.9
        annealed = typed.estimator.name == "slope_annealed_st"
        assert (typed.schedule.name == "exponential") == annealed
        assert annealed or typed.schedule.temperature(40_000) == 1.0  # the paper's fixed tau = 1
    assert {len(c) for c in cells({j: sorted(j) for j in grid}, halving.cell).values()} == {6, 24}


def test_a_halving_sweep_through_the_packed_launcher_packs_each_rung_and_keeps_each_jobs_folder(tmp_path):
    sweep = tmp_path / "sweep"
    result = gvae_train(["-m", *SYNTHETIC, "train.eval_every=20", "eval.images=false", *HALVING,
                         "hydra/launcher=packed", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 runs packed" in result.stdout and "2 runs packed" in result.stdout
    record, found = json.loads((sweep / "halving.json").read_text()), curves(sweep)
    for cell, (first, _) in record["cells"].items():
        by_val = sorted(map(int, first["scores"]), key=lambda n: value_at(found[n], 20))
        assert first["survivors"] == by_val[:2]
        assert all(found[n][-1][0] == 40 and [20, value_at(found[n], 20)] in found[n] for n in by_val[:2])
        assert found[by_val[2]][-1][0] == 20
        assert record["choices"][cell] == min(by_val[:2], key=lambda n: value_at(found[n], 40))


def test_the_committed_halving_replay_regenerates_byte_for_byte_from_the_cpu_tables_records(tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "halving_replay.py"
    records = ["docs/results/cpu_table", "docs/results/cpu_table_beyond"]
    result = subprocess.run([sys.executable, str(script), *records, "--out", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("replay.md", "replay.json"):
        committed = root / "docs" / "results" / "halving_replay" / name
        assert (tmp_path / name).read_bytes() == committed.read_bytes()


def test_table1_vae_searches_the_papers_whole_grid_with_annealing_only_where_there_is_a_temperature(tmp_path):
    from hydra import compose
    from omegaconf import OmegaConf

    from gvae.config import hydra_initialized, validate
    from tests.conftest import compose_config

    with hydra_initialized():
        cfg = compose("config", ["experiment=table1_vae"], return_hydra_config=True)
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))
    grid = table.expected_jobs(tmp_path)
    assert len(grid) == len(set(grid)) == 6 * (4 + 3 * 4)
    halving = table.halving_of(tmp_path)
    assert {len(c) for c in cells({j: sorted(j) for j in grid}, halving.cell).values()} == {6, 24}
    for job in {frozenset(o for o in job if not o.startswith("optim.lr=")) for job in grid}:
        typed = validate(compose_config(["experiment=table1_vae", *sorted(job)]))
        assert typed.task.name == "vae" and typed.model.hidden == [] and typed.optim.momentum == 0.9
        tempered = typed.estimator.name in ("gumbel_softmax", "st_gumbel_softmax", "slope_annealed_st")
        assert any(o.startswith("schedule.") for o in job) == tempered
