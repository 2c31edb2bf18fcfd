"""Table 1's budget: each cell's chosen setting trained on past the halving's last rung, by resuming.

    python scripts/budget_study.py run outputs/multirun/table1_sbn_categorical --steps 80000 \
        --runs outputs/budget --workers 2
    gvae-eval eval.num_samples=1000 outputs/budget/*/*          # the test figures at the new length
    python scripts/budget_study.py record outputs/budget --out docs/results/table1_budget
    python scripts/budget_study.py render docs/results/table1_budget   # again, from curves.json alone

Where the sweep's folders are gone (another machine, a fresh checkout), the committed table record
names the same runs: `run table1_vae_bernoulli --record docs/results/table1/jobs.json ...`
trains each chosen setting's seed-0 run from step 0 to the record's rung, evaluates it there with the
record's m (RUNG_EVAL), and continues it; `record --keep` adds such runs to an existing record.

`run` copies the seed-0 run of every cell's chosen setting (the halving's own run of it, trained to
the last rung) to RUNS/<sweep>/<job> and resumes it there to --steps: the sweep's folders, which the
table's record reads, are left as they are. A resumed run is the run trained straight to its length
(tests/test_halving.py), so each curve is one run's curve from step 0. The copy's eval.json, the
m = 1000 figures at the rung, is kept as rung_eval.json. Rerunning `run` continues unfinished runs
and skips finished ones. `record` writes OUT/curves.json, the compact record (each run's setting,
validation curve and figures); `render` writes OUT/budget.md and OUT/figure.png from it and
OUT/notes.md alone, so a test regenerates them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

from gvae.errors import GvaeError
from gvae.files import atomic_write, write_json
from gvae.rows import HALVING_KEYS, key_of
from gvae.runs import find_runs, natural_key, read_json
from gvae.table import (
    BEYOND,
    COLUMNS,
    FINAL,
    PAPER_TABLE,
    TableError,
    flat_from,
    label_curves,
    late_slope,
    read_sweeps,
    row_label,
    save_figure,
    select,
    slope_text,
    typed,
)

RUNG_EVAL = "rung_eval.json"  # the m = 1000 figures of the copied run, at the length it was copied at
COPYING = ".copying"  # a copy not yet whole


def name(run: dict) -> str:
    """The paper's column name of a run's estimator (table.name's, for a run rather than a cell)."""
    return COLUMNS.get(run["estimator"], f"{run['estimator']}{BEYOND}")


def chosen_runs(sweep: Path) -> list[tuple[str, Path]]:
    """(job name, folder) of the seed-0 run of each cell's chosen setting in `sweep`."""
    record = read_sweeps([sweep])
    if pending := [j["job"] for j in record["jobs"] if j["status"] not in FINAL]:
        raise TableError(f"{sweep}: {len(pending)} jobs not finished (e.g. {pending[0]}): no choices yet")
    out = []
    for cell in select(record):
        if cell.chosen:
            first = cell.runs[0]  # the lowest seed: the halving's run of the setting
            out.append((first["job"], sweep / first["job"].partition("/")[2]))
    return out


def train_command(overrides: list[str], dest: Path, steps: int) -> list[str]:
    kept = [o for o in overrides if key_of(o) not in HALVING_KEYS]
    return [sys.executable, "-m", "gvae.train", *kept, f"train.max_steps={steps}", "train.resume=true",
            f"hydra.run.dir={dest}"]


def continue_command(src: Path, dest: Path, steps: int) -> list[str]:
    return train_command([str(o) for o in OmegaConf.load(src / ".hydra" / "overrides.yaml")], dest, steps)


def recorded_runs(path: Path, sweep: str) -> tuple[list[dict], int]:
    """The seed-0 job of each cell's chosen setting of `sweep` in a table record, and the record's m."""
    record = read_json(path)
    if record is None or "jobs" not in record:
        raise TableError(f"{path}: not a table record (gvae-table record writes one)")
    names = [s["name"] for s in record["sweeps"]]
    if sweep not in names:
        raise TableError(f"{path}: no sweep {sweep!r} (it has {', '.join(names)})")
    cells = select({**record, "jobs": [j for j in record["jobs"] if j["job"].partition("/")[0] == sweep]})
    command = next(s["command"] for s in record["sweeps"] if s["name"] == sweep)
    firsts = [cell.runs[0] for cell in cells if cell.chosen]
    return [{**job, "overrides": job_overrides(command, job)} for job in firsts], record["num_samples"]


def job_overrides(command: str, job: dict) -> list[str]:
    """A recorded job's whole command line: its sweep's (which also holds keys outside the setting,
    such as how often it evaluates) with the job's setting and seed in place of the swept values."""
    own = [*job["setting"], f"seed={job['seed']}"]
    keys = {key_of(o) for o in own}
    base = [o for o in shlex.split(command)[2:]  # past "gvae-train -m"
            if key_of(o) not in keys and not o.startswith("hydra")]
    if swept := [o for o in base if "," in o.partition("=")[2]]:
        raise TableError(f"sweep command {command!r}: {swept[0]} is swept but not in the job's setting")
    return base + own


def prepare(src: Path, dest: Path) -> None:
    """dest: a copy of src (made whole before it gets its name, so an interrupted copy is not taken
    for a run), its eval.json kept as RUNG_EVAL."""
    if dest.exists():
        return
    partial = dest.with_name(dest.name + COPYING)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(src, partial)
    if (partial / "eval.json").is_file():
        (partial / "eval.json").rename(partial / RUNG_EVAL)
    partial.rename(dest)


def rung_commands(job: dict, dest: Path, num_samples: int) -> list[list[str]]:
    """A recorded job retrained from step 0 to its own length and evaluated there, unless done."""
    if (dest / RUNG_EVAL).is_file():
        return []
    return [train_command(job["overrides"], dest, job["metrics"]["step"]),
            [sys.executable, "-m", "gvae.evaluation", str(dest), f"eval.num_samples={num_samples}"]]


def run(sweeps: list[Path], runs: Path, steps: int, workers: int,
        record_path: Path | None = None) -> int:
    commands = []  # per run, the commands to run in turn
    if record_path is not None:
        for sweep in sweeps:
            jobs, num_samples = recorded_runs(record_path, str(sweep))
            for job in jobs:
                dest = runs / job["job"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                commands.append((dest, [*rung_commands(job, dest, num_samples),
                                        train_command(job["overrides"], dest, steps)]))
    else:
        for sweep in sweeps:
            for job, src in chosen_runs(sweep):
                dest = runs / job
                dest.parent.mkdir(parents=True, exist_ok=True)
                prepare(src, dest)
                commands.append((dest, [continue_command(src, dest, steps)]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one core per worker

    def one(item: tuple[Path, list[list[str]]]) -> int:
        dest, steps_of_run = item
        code = 0
        with open(dest.with_name(dest.name + ".log"), "a") as log:
            for command in steps_of_run:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
                if code:
                    break
                if command[2] == "gvae.evaluation":  # the figures at the rung, kept apart
                    (dest / "eval.json").rename(dest / RUNG_EVAL)
        print(f"{dest}: {'done' if code == 0 else f'failed ({code}), see its .log'}", flush=True)
        return code

    with ThreadPoolExecutor(workers) as pool:
        codes = list(pool.map(one, commands))
    return max(codes, default=0)


def run_record(folder: Path, runs: Path) -> dict:
    metrics = read_json(folder / "metrics.json")
    if metrics is None or metrics.get("status") != "complete":
        raise TableError(f"{folder}: not finished (no complete metrics.json); run `run` again")
    cfg = typed(OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "config.yaml"), resolve=True))
    evaluation = read_json(folder / "eval.json")
    if evaluation is not None and evaluation["step"] != metrics["step"]:
        evaluation = None  # evaluated at an earlier length: not this run's figures
    overrides = [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]
    keep = ("step", "test_nelbo", "test_bound", "test_literal_bound", "num_samples")

    def kept(figures: dict | None) -> dict | None:
        return {k: v for k, v in figures.items() if k in keep} if figures else None

    return {"job": folder.relative_to(runs).as_posix(), "latent": row_label(cfg),
            "estimator": cfg.estimator.name,
            "setting": sorted(o for o in overrides if key_of(o) not in
                              (*HALVING_KEYS, "hydra.run.dir", "experiment")),
            "steps": metrics["step"], "val_curve": metrics["val_curve"],
            "rung_eval": kept(read_json(folder / RUNG_EVAL)), "eval": kept(evaluation)}


def record(runs: Path, out: Path, keep: bool = False) -> None:
    """OUT/curves.json from RUNS' folders; with `keep`, the runs of the existing record that RUNS does
    not hold stay (a record built over sessions, on machines that no longer hold the earlier folders)
    and RUNS' unfinished runs are left out."""
    folders = [f for f in find_runs([runs]) if not f.name.endswith(COPYING)]
    if not folders:
        raise TableError(f"{runs}: no run folders")
    if keep:  # adding to a record as runs finish: an unfinished one waits for the next `record`
        unfinished = [f for f in folders if (read_json(f / "metrics.json") or {}).get("status") != "complete"]
        for f in unfinished:
            print(f"{f}: not finished, left out", file=sys.stderr)
        folders = [f for f in folders if f not in unfinished]
    new = [run_record(f, runs) for f in folders]
    old = (read_json(out / "curves.json") or {"runs": []})["runs"] if keep else []
    jobs = {r["job"] for r in new}
    out.mkdir(parents=True, exist_ok=True)
    kept = [r for r in old if r["job"] not in jobs]
    write_json(out / "curves.json", {"runs": sorted(kept + new, key=lambda r: natural_key(Path(r["job"])))})


def value_at(curve: list, step: int) -> float | None:
    return next((v for s, v in curve if s == step), None)


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(data: dict, notes: str) -> str:
    order = {cell: i for i, cell in enumerate(PAPER_TABLE)}
    runs = sorted(data["runs"],
                  key=lambda r: (r["latent"], order.get((r["latent"], r["estimator"]), len(order))))
    rung = {r["rung_eval"]["step"] for r in runs if r["rung_eval"]}
    rung_step = min(rung) if len(rung) == 1 else None
    lines = ["# Table 1's budget: each cell's chosen setting trained on", "",
             "Generated by `python scripts/budget_study.py render` from `curves.json` and `notes.md`; "
             "do not edit by hand.", "",
             "One run per cell (seed 0 of the setting the halving chose), resumed from the halving's last "
             "rung and trained on. **val** is its validation -ELBO at a step; **slope**, the least-squares "
             "slope of its curve's last quarter (nats per 10,000 steps; negative: still falling); **flat "
             "from**, the first step from which it stays within 1 nat of its final value. **bound** is the "
             "m = 1000 test bound, -log (1/m) Σ p/q, of this run (one seed) at the rung and at the end; "
             "*not measured* where it was not evaluated. Nats.", ""]
    lines += ["| latent | estimator | paper | val at 20000 | "
              f"val at {rung_step or 'the rung'} | val at end | end step | slope at end | flat from | "
              "bound at the rung | bound at end | Δ paper at the rung | Δ paper at end |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        curve = r["val_curve"]
        paper = PAPER_TABLE.get((r["latent"], r["estimator"]))
        before = r["rung_eval"]["test_bound"] if r["rung_eval"] else None
        after = r["eval"]["test_bound"] if r["eval"] else None
        delta = [f"{b - paper:+.2f}" if b is not None and paper is not None else "not measured"
                 for b in (before, after)]
        lines.append(f"| {r['latent']} | {name(r)} | {paper if paper is not None else '—'} | "
                     f"{fmt(value_at(curve, 20000))} | "
                     f"{fmt(value_at(curve, r['rung_eval']['step']) if r['rung_eval'] else None)} | "
                     f"{fmt(curve[-1][1])} | {curve[-1][0]} | {slope_text(late_slope(curve))} | "
                     f"{flat_from(curve)} | {fmt(before) if before is not None else 'not measured'} | "
                     f"{fmt(after) if after is not None else 'not measured'} | {' | '.join(delta)} |")
    lines += ["", "## Runs", "", "| job | setting |", "|---|---|"]
    lines += [f"| {r['job']} | {', '.join(r['setting'])} |" for r in runs]
    text = "\n".join(lines) + "\n"
    return text + ("\n" + notes if notes else "")


def figure(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latents = sorted({r["latent"] for r in data["runs"]})
    fig, axes = plt.subplots(1, len(latents), figsize=(6 * len(latents), 4.5), squeeze=False)
    for ax, latent in zip(axes[0], latents, strict=True):
        for i, r in enumerate(x for x in data["runs"] if x["latent"] == latent):
            steps, values = zip(*r["val_curve"], strict=True)
            ax.plot(steps, values, label=name(r), color=plt.get_cmap("tab10")(i))
        rungs = {r["rung_eval"]["step"] for r in data["runs"] if r["latent"] == latent and r["rung_eval"]}
        for step in rungs:
            ax.axvline(step, color="grey", lw=0.8, ls="--")
        values = [v for r in data["runs"] if r["latent"] == latent for _, v in r["val_curve"]]
        ax.set_ylim(min(values) - 2, min(ax.get_ylim()[1], statistics.median(values) + 40))
        label_curves(ax, f"{latent}: validation -ELBO (dashed: the halving's last rung)")
    save_figure(fig, path)


def render(out: Path) -> str:
    data = read_json(out / "curves.json")
    if data is None:
        raise TableError(f"{out / 'curves.json'} does not exist: run `record` first")
    notes = out / "notes.md"
    text = markdown(data, notes.read_text() if notes.is_file() else "")
    figure(data, out / "figure.png")
    atomic_write(out / "budget.md", lambda f: f.write(text.encode()))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="continue each cell's chosen run, in copies, to --steps")
    r.add_argument("sweeps", type=Path, nargs="+", help="sweep folders, or with --record sweep names")
    r.add_argument("--record", type=Path, help="a table record (jobs.json) naming the runs, which "
                   "are then trained from step 0")
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--runs", type=Path, required=True, help="where the copies train")
    r.add_argument("--workers", type=int, default=2)
    rec = sub.add_parser("record", help="RUNS' runs into OUT/curves.json, then render")
    rec.add_argument("runs", type=Path)
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--keep", action="store_true",
                     help="keep OUT's recorded runs that RUNS lacks; leave out RUNS' unfinished runs")
    ren = sub.add_parser("render", help="OUT/budget.md and OUT/figure.png from OUT/curves.json")
    ren.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run(args.sweeps, args.runs, args.steps, args.workers, args.record)
        if args.command == "record":
            record(args.runs, args.out, args.keep)
        print(render(args.out))
    except (GvaeError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
