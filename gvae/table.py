"""`gvae-table`: the paper's Table 1 and Figure 4 from sweeps, beside the paper's numbers.

    gvae-train -m experiment=cpu_table                                  # or paper_sweep
    gvae-table chosen outputs/multirun/cpu_table | xargs gvae-eval eval.num_samples=1000
    gvae-table record outputs/multirun/cpu_table --out docs/results/cpu_table
    gvae-table render docs/results/cpu_table          # again, from the record alone

`record` reads every job folder of one or more Hydra multiruns (.hydra/, metrics.json, eval.json,
failed.json) into DIR/jobs.json, a compact record of every job (overrides, run-defining config,
status, final figures, validation curve) that belongs in git, then renders it if it is complete.
`render` writes DIR/results.md and DIR/figure.png from jobs.json (and DIR/notes.md, the
protocol's hand-written notes, when present) and nothing else, so it regenerates results.md
byte for byte. `chosen` prints the run folders of each cell's chosen setting: those that need
the m = 1000 bound.

Selection never sees the test set: in each cell (the row its task gives a run, e.g. the VAE's
latent type, and the estimator) the setting (a job's overrides of keys that are part of a setting,
gvae/roles.py: not the seed) with the best mean final validation figure over its seeds is chosen,
among settings whose seeds all completed; test figures are read for that setting only.
A cell is reported only when every job of the sweeps has finished (or failed, which is shown):
a partial average is never reported as if it were complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import multiprocessing
import os
import shlex
import statistics
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gvae.checkpoint import check_compatible, config_differences, defining_values, load_checkpoint
from gvae.config import Config, config_from_dict, container, flatten, import_extensions
from gvae.errors import GvaeError
from gvae.estimators import ESTIMATORS
from gvae.files import atomic_write, write_json
from gvae.halving import HalvingConfig, value_at
from gvae.halving import cells as halving_cells
from gvae.halving import rung as halving_rung
from gvae.roles import keys_with, role_of
from gvae.rows import HALVING_KEYS, cross, key_of
from gvae.run_folder import job_settings, same_run
from gvae.runs import find_runs, read_json, run_status
from gvae.tasks import TASKS

# Table 1 of Jang et al. (2017): the VAE rows, "negative variational lower bounds (nats)" on the test
# set, m = 1000 (which bound, see docs/results/*/results.md), and the structured-output (SBN) rows,
# negative log-likelihoods estimated with m = 1000 (Section 4.1).
COLUMNS = {  # estimator: the paper's column name, in the paper's order
    "score_function": "SF",
    "darn": "DARN",
    "muprop": "MuProp",
    "straight_through": "ST",
    "slope_annealed_st": "Annealed ST",
    "gumbel_softmax": "Gumbel-S.",
    "st_gumbel_softmax": "ST Gumbel-S.",
}
PAPER = {
    "Bernoulli (200)": [112.2, 110.9, 109.7, 116.0, 111.5, 105.0, 111.5],
    "categorical (20x10)": [110.6, 128.8, 107.0, 110.9, 107.8, 101.5, 107.8],
    "SBN Bernoulli (200)": [72.0, 59.7, 58.9, 58.9, 58.7, 58.5, 59.3],
    "SBN categorical (20x10)": [73.1, 67.9, 63.0, 61.8, 61.1, 59.0, 59.7],
}
PAPER_TABLE = {(latent, est): v for latent, row in PAPER.items() for est, v in zip(COLUMNS, row, strict=True)}
METRICS = ("step", "val_nelbo", "val_nelbo_best", "test_nelbo", "test_bound", "test_literal_bound",
           "num_samples", "steps_per_sec", "wall_seconds", "device_name")
EVAL = ("step", "val_nelbo", "test_nelbo", "test_bound", "test_literal_bound", "num_samples",
        "test_relaxed_nelbo", "relaxed_tau", "wall_seconds", "device_name")
READINGS = ("test_nelbo", "test_bound", "test_literal_bound")  # the figures set beside the paper's
FINAL = ("complete", "failed")  # statuses a table can be made with


class TableError(GvaeError):
    """The sweeps or the record cannot make a table; the message names the jobs and why."""


# -----------------------------------------------------------------------------
# reading sweeps into a record


def row_label(cfg: Config) -> str:
    """The table's row for a run: its task's label ("categorical (20x10)", "SBN Bernoulli (200)")."""
    return TASKS[cfg.task.name].label(cfg.model, cfg.task)


def estimator_label(cfg: Config) -> str:
    """The table's estimator for a run: its name, and what changes its gradient beyond a number: a
    learned control variate, the K-sample objective ("rebar (learned)", "vimco (iwae K=2)")."""
    extra = cfg.estimator.qualifiers()
    if cfg.task.objective.value != "elbo":
        extra.append(f"{cfg.task.objective.value} K={cfg.task.samples}")
    return cfg.estimator.name + (f" ({', '.join(extra)})" if extra else "")


def decoder_passes(job: dict[str, Any]) -> int:
    """A job's decoder passes per step (per stochastic layer), from its recorded estimator options and
    objective (a record made before objectives existed trained the single-sample one)."""
    flat = job["config"]
    schema = ESTIMATORS[flat["estimator.name"]].config
    names = {f.name for f in dataclasses.fields(schema)}
    options = {k.removeprefix("estimator."): v for k, v in flat.items()
               if k.startswith("estimator.") and k.removeprefix("estimator.") in names}
    return schema(**options).decoder_passes(flat.get("task.objective", "elbo"), flat.get("task.samples", 1))


def in_setting(override: str, cfg: Config) -> bool:
    """Whether an override is part of a job's setting: by its key's role in the typed `cfg`, and for
    keys no schema holds, all but Hydra's own (an experiment's name and helper keys are)."""
    key = override.lstrip("+~").split("=", 1)[0]
    role = role_of(cfg, key)
    if role is None:
        return not (key == "hydra" or key.startswith(("hydra.", "hydra/")))
    return role.in_setting


def typed(saved: dict[str, Any]) -> Config:
    """A job's saved config (plain values) as today's typed schema (gvae/config.py)."""
    return OmegaConf.to_object(config_from_dict(saved))


# The roles of keys of a job never started (no config to read them from): a default config's.
DEFAULT = {"estimator": {"name": "gumbel_softmax"}, "schedule": {"name": "exponential"},
           "optim": {"_target_": "torch.optim.Adam"}}


def halving_of(sweep_dir: Path) -> HalvingConfig | None:
    """The sweep's successive halving (hydra.sweeper.halving with rungs), or None."""
    sweeper = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.sweeper
    found = sweeper.get("halving")
    return HalvingConfig(**OmegaConf.to_container(found)) if found and found.get("rungs") else None


def job_overrides(overrides) -> frozenset[str]:
    """A halving sweep's job's overrides without those the sweep sets at each rung (gvae/rows.py:
    the job is the same one at every rung, whatever length the command line gave)."""
    return frozenset(o for o in overrides if key_of(o) not in HALVING_KEYS)


def expected_jobs(sweep_dir: Path) -> list[frozenset[str]]:
    """The overrides of every job the sweep launches: the product of its swept values, as Hydra's
    basic sweeper forms it from hydra.sweeper.params and the command line (which wins per key),
    crossed with the rows of the rows sweeper (hydra/sweeper=rows) when there are any. (A halving
    sweep's grid: the seeds of its choices depend on the decisions, halving_jobs.)"""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        raise TableError(f"{path} is missing: {sweep_dir} is not the folder of a Hydra multirun")
    hydra_cfg = OmegaConf.load(path).hydra
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.params or {}).items()]
    by_key: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides([*params, *hydra_cfg.overrides.task]):
        key = override.get_key_element()
        if override.is_sweep_override():
            by_key[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            by_key[key] = [f"{key}={override.get_value_element_as_str()}"]
    jobs = [list(job) for job in itertools.product(*by_key.values())]
    return [frozenset(job) for job in cross(jobs, list(hydra_cfg.sweeper.get("rows") or []))]


def check_consistent(folder: Path, cfg: dict[str, Any], metrics: dict[str, Any],
                     evaluation: dict[str, Any] | None) -> None:
    """TableError unless the job's recorded config (.hydra/config.yaml), its checkpoint, its
    metrics.json and its eval.json describe the same run and the same state: a folder whose record
    was rewritten (an old gvae let a refused resume do it) would put one setting's figures under
    another's name, and an eval.json of an earlier state (evaluated, then resumed) one state's test
    figures beside another's selection."""
    try:
        recorded = defining_values(cfg)
        path = folder / "checkpoints" / "last.pt"
        saved = load_checkpoint(path)
        check_compatible(path, saved["config"], cfg)
    except GvaeError as e:
        raise TableError(f"job {folder}: its config (.hydra/config.yaml) and its checkpoint disagree, "
                         f"so its figures cannot be attributed: {e}") from None
    if saved["step"] != metrics.get("step"):
        raise TableError(f"job {folder}: metrics.json is of step {metrics.get('step')}, its checkpoint "
                         f"of step {saved['step']}")
    state = f"its checkpoint {path} (step {saved['step']}, {saved['sha256'] or 'no checksum'})"
    if not same_state(metrics, saved):
        raise TableError(f"job {folder}: metrics.json is of another state than {state}: "
                         f"{metrics.get('checkpoint_sha256')}")
    if evaluation is not None and not same_state(evaluation, saved):
        raise TableError(f"job {folder}: eval.json is of step {evaluation.get('step')} "
                         f"({evaluation.get('checkpoint_sha256') or 'no checksum recorded'}), {state}: "
                         f"test figures of one state beside the selection of another. Evaluate it again: "
                         f"gvae-eval --force {folder}")
    if "run_config" in metrics:  # written since 2026-11-28; typed again: keys added since take defaults
        if differ := config_differences(defining_values(unflatten(metrics["run_config"])), recorded):
            details = "; ".join(f"{k}: {a!r} in metrics.json, {b!r} in .hydra/config.yaml"
                                for k, a, b in differ)
            raise TableError(f"job {folder}: its metrics and its config disagree ({details})")


def same_state(record: dict[str, Any], saved: dict[str, Any]) -> bool:
    """Whether a record (metrics.json, eval.json) is of the checkpoint's state: the same step, and the
    same checksum where both have one (records and checkpoints before 2026-12-07 have none)."""
    digest, saved_digest = record.get("checkpoint_sha256"), saved["sha256"]
    return record.get("step") == saved["step"] and not (digest and saved_digest and digest != saved_digest)


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{dotted.key: value} back into nested dicts."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def read_yaml(path: Path, folder: Path) -> Any:
    """A job's Hydra record (.hydra/*.yaml), or TableError naming the file."""
    try:
        return OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001  (yaml's and OmegaConf's errors alike: the file is damaged)
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise TableError(f"job {folder}: {path} cannot be read ({why}); its record is damaged") from None


def job_record(folder: Path, sweep_name: str, sweep_dir: Path, halving: bool = False) -> dict[str, Any]:
    overrides = [str(o) for o in read_yaml(folder / ".hydra" / "overrides.yaml", folder)]
    overrides = sorted(job_overrides(overrides)) if halving else overrides
    cfg = OmegaConf.to_container(read_yaml(folder / ".hydra" / "config.yaml", folder), resolve=True)
    # Typed (only the trainer's own keys: a sweep may add helper keys; defaults for keys added since).
    try:
        schema = typed(cfg)
    except GvaeError as e:
        raise TableError(f"job {folder}: {folder / '.hydra' / 'config.yaml'}: {e}") from None
    flat = flatten(container(schema))
    status, error = run_status(folder)
    metrics = read_json(folder / "metrics.json") if status == "complete" else None
    evaluation = read_json(folder / "eval.json") if status == "complete" else None
    if metrics is not None:
        check_consistent(folder, cfg, metrics, evaluation)
    return {
        "job": f"{sweep_name}/{folder.relative_to(sweep_dir).as_posix()}",
        "latent": row_label(schema), "estimator": estimator_label(schema), "seed": flat["seed"],
        "setting": sorted(o for o in overrides if in_setting(o, schema)),
        "config": dict(sorted(keys_with(schema, flat, "in_record").items())),
        # Relative to the sweep, like "job": a committed record names no folder of this machine.
        "status": status, "error": error and error.replace(str(sweep_dir.resolve()), sweep_name),
        "metrics": {k: metrics.get(k) for k in METRICS} if metrics else None,
        "eval": {k: evaluation[k] for k in EVAL if k in evaluation} if evaluation else None,
        "val_curve": metrics.get("val_curve") if metrics else None,
    }


SWEEP_SHAPE = ("hydra.sweeper.", "hydra/sweeper=", "hydra.launcher.", "hydra/launcher=")


def read_sweeps(sweep_dirs: list[Path], workers: int | None = None) -> dict[str, Any]:
    """The record of every job of the sweeps: found folders, and expected jobs with no folder.
    `workers`: processes reading the jobs' records (job_records; default: by the number of jobs)."""
    sweeps, jobs, parts = [], [], []
    for sweep_dir in sweep_dirs:
        halving = halving_of(sweep_dir)
        same = job_overrides if halving else frozenset  # what makes two jobs the same job
        folders = find_runs([sweep_dir]) if any(sweep_dir.glob("**/.hydra/config.yaml")) else []
        found = {same(map(str, OmegaConf.load(f / ".hydra" / "overrides.yaml"))): f for f in folders}
        parts.append((sweep_dir, halving, same, folders, found))
    every = [(f, sweep_dir.name, sweep_dir, bool(halving))
             for sweep_dir, halving, _, _, found in parts for f in found.values()]
    read = dict(zip((args[0] for args in every), job_records(every, workers), strict=True))
    for sweep_dir, halving, same, folders, found in parts:
        name = sweep_dir.name
        expected = [same(job) for job in expected_jobs(sweep_dir)]
        found = by_expected_job(expected, found)
        overrides = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides
        # the sweep's own shape (rows, halving, launcher) is part of the command; its folder is named
        shape = [o for o in overrides.hydra if o.startswith(SWEEP_SHAPE)]
        sweeps.append({"name": name, "command": shlex.join(["gvae-train", "-m", *shape, *overrides.task]),
                       "jobs": len(expected) + (halving_seed_jobs(expected, halving) if halving else 0),
                       **({"halving": dataclasses.asdict(halving)} if halving else {})})
        records = {overrides: read[f] for overrides, f in found.items()}
        roles_from = typed(OmegaConf.to_container(OmegaConf.load(folders[0] / ".hydra" / "config.yaml"),
                                                  resolve=True)) if folders else typed(DEFAULT)

        def missing(job: frozenset[str], name: str = name, roles_from: Config = roles_from) -> dict[str, Any]:
            return {"job": f"{name}/(not started)",
                    "setting": sorted(o for o in job if in_setting(o, roles_from)),
                    "overrides": sorted(job), "status": "missing", "error": "no job folder"}

        if halving:
            jobs += halving_jobs(expected, records, halving, missing)
        else:
            jobs += list(records.values()) + [missing(job) for job in expected if job not in found]
    return {"sweeps": sweeps, "jobs": jobs}


def by_expected_job(expected: list[frozenset[str]],
                    found: dict[frozenset[str], Path]) -> dict[frozenset[str], Path]:
    """The found folders keyed by the expected job each holds: its exact overrides, else the one
    expected job whose run it is at another length or cadence (gvae.run_folder.same_run, the rule by
    which a relaunched sweep's job finds its folder: e.g. a sweep resumed with train.ckpt_every
    changed, whose finished jobs keep the overrides they were launched with)."""
    exact = set(expected)
    keyed: dict[frozenset[str], Path] = {}
    for overrides, folder in found.items():
        if overrides not in exact:
            runs = [job for job in expected if job not in found and job not in keyed
                    and same_run(job_settings(job), job_settings(overrides))]
            overrides = runs[0] if len(runs) == 1 else overrides  # a second folder of one run: its own
        keyed[overrides] = folder
    return keyed


JOBS_PER_READER = 16  # below this many jobs a process each, reading them costs less than starting it


def job_records(jobs: list[tuple[Path, str, Path, bool]], workers: int | None = None) -> list[dict[str, Any]]:
    """job_record(*args) for each job, in order: in `workers` processes (default: one per core, at
    most one per JOBS_PER_READER jobs), since checking a job types its config from three records
    through OmegaConf, a fraction of a second a job, and a full table has hundreds. The first job
    that fails its check raises, as it would read alone."""
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), len(jobs) // JOBS_PER_READER)
    # Spawned, not forked (a forked child of a process that ran torch's OpenMP kernels can hang); a
    # spawned process imports the main module again, which a script read from stdin does not allow.
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if workers < 2 or len(jobs) < 2 or (main is not None and not os.path.isfile(main)):
        return [job_record(*args) for args in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=import_extensions) as pool:
        return list(pool.map(job_record, *zip(*jobs, strict=True), chunksize=4))


def halving_seed_jobs(grid: list[frozenset[str]], halving: HalvingConfig) -> int:
    """How many seed jobs the halving adds: its seeds for each cell's choice."""
    return len(halving_cells({job: list(job) for job in grid}, halving.cell)) * len(halving.seeds)


def halving_jobs(grid: list[frozenset[str]], records: dict[frozenset[str], dict], halving: HalvingConfig,
                 missing) -> list[dict[str, Any]]:
    """A halving sweep's job records, in grid order then the seeds: each grid job as found (a survivor
    not yet at its next rung is "unfinished") or missing, and for each cell whose rungs are all
    decided its choice's seeds, found or missing. The decisions are gvae/halving.py's, from the
    validation curves of the records alone, as the sweeper made them."""
    out = [dict(records[job], grid=True) if job in records else missing(job) for job in grid]
    by_job = dict(zip(grid, out, strict=True))
    for cell_jobs in halving_cells({job: sorted(job) for job in grid}, halving.cell).values():
        decided = halving_decisions(cell_jobs, by_job, halving)
        if decided is None:
            continue
        (choice,) = decided[-1].survivors
        for seed in halving.seeds:
            job = frozenset([*(o for o in choice if key_of(o) != "seed"), f"seed={seed}"])
            out.append(dict(records[job], grid=False) if job in records else missing(job))
    return out


def halving_decisions(cell_jobs: list, by_job: dict, halving: HalvingConfig):
    """The rungs of one cell from its grid jobs' records, or None while a rung is not decided (one of
    its jobs missing, unfinished or not yet trained to it); a survivor not yet trained to the next
    rung is marked unfinished in place."""
    def score(job, steps: int) -> float:
        return value_at(by_job[job].get("val_curve"), steps)

    alive = list(cell_jobs)
    rungs = []
    for i, steps in enumerate(halving.rungs):
        waiting = False
        for job in alive:
            record = by_job[job]
            reached = record["status"] == "complete" and record["metrics"]["step"] >= steps
            if record["status"] == "complete" and not reached:
                record["status"], record["error"] = "unfinished", f"halving: to train on to {steps} steps"
            waiting |= not (reached or record["status"] == "failed")
        if waiting:
            return None
        rungs.append(halving_rung(alive, score, steps, halving.eta, i == len(halving.rungs) - 1,
                                  halving.min_kept))
        alive = rungs[-1].survivors
    return rungs


# -----------------------------------------------------------------------------
# selection on validation


@dataclasses.dataclass
class Cell:
    latent: str
    estimator: str
    settings: dict[tuple[str, ...], list[dict]]  # every setting's jobs
    chosen: tuple[str, ...] | None  # the setting picked on validation, None if every one failed
    by_halving: bool = False  # its settings differ in length by the halving's rungs, not by choice

    @property
    def runs(self) -> list[dict]:
        return sorted(self.settings[self.chosen], key=lambda j: j["seed"]) if self.chosen else []

    def searched_keys(self) -> list[str]:
        """The config keys whose values differ between this cell's settings."""
        configs = [jobs[0]["config"] for jobs in self.settings.values()]
        ignored = {"seed", *(HALVING_KEYS if self.by_halving else ())}
        return sorted(k for k in configs[0]
                      if k not in ignored and len({repr(c.get(k)) for c in configs}) > 1)

    def label(self, setting: tuple[str, ...]) -> str:
        config = self.settings[setting][0]["config"]
        return ", ".join(f"{k}={config.get(k)}" for k in self.searched_keys()) or "(one setting)"

    def failed_settings(self) -> list[str]:
        """Each setting with failed seeds, and how many."""
        out = []
        for setting, jobs in self.settings.items():
            if failed := [j for j in jobs if j["status"] != "complete"]:
                out.append(f"{self.label(setting)} ({len(failed)} of {len(jobs)} seeds)")
        return out


def mean_val(jobs: list[dict]) -> float:
    return statistics.fmean(j["metrics"]["val_nelbo"] for j in jobs)


def select(record: dict[str, Any]) -> list[Cell]:
    """Per (latent, estimator): the setting with the best mean final validation negative ELBO
    over its seeds, among the settings whose seeds all completed; in a halving sweep, the halving's
    choice (gvae/halving.py), whose seeds must all have completed."""
    halving = {s["name"]: HalvingConfig(**s["halving"]) for s in record["sweeps"] if s.get("halving")}
    groups: dict[tuple[str, str], dict[tuple[str, ...], list[dict]]] = defaultdict(lambda: defaultdict(list))
    for job in record["jobs"]:
        if job["status"] != "missing":  # a job never started has no config to place it by
            groups[job["latent"], job["estimator"]][tuple(job["setting"])].append(job)
    cells = []
    for (latent, estimator), settings in groups.items():
        for jobs in settings.values():
            seeds = [j["seed"] for j in jobs]
            if len(set(seeds)) != len(seeds):
                raise TableError(f"the same setting and seed ran twice: {', '.join(j['job'] for j in jobs)}")
        complete = {s: jobs for s, jobs in settings.items() if all(j["status"] == "complete" for j in jobs)}
        sweep = halving.get(next(iter(next(iter(settings.values()))))["job"].split("/", 1)[0])
        if sweep is not None:  # the halving's choice, made again from the record's curves
            grid = {j["job"]: j for jobs in settings.values() for j in jobs if j.get("grid")}
            decided = halving_decisions(list(grid), grid, sweep)
            choice = tuple(grid[decided[-1].survivors[0]]["setting"]) if decided else None
            chosen = choice if choice in complete else None
        else:
            chosen = min(complete, key=lambda s: (mean_val(complete[s]), s)) if complete else None
        cells.append(Cell(latent, estimator, dict(settings), chosen, by_halving=sweep is not None))
    order = {name: i for i, name in enumerate(COLUMNS)}
    return sorted(cells, key=lambda c: (c.latent, order.get(c.estimator, len(order)), c.estimator))


def check_finished(record: dict[str, Any]) -> None:
    pending = [j for j in record["jobs"] if j["status"] not in FINAL]
    if pending:
        total = len(record["jobs"])
        raise TableError(
            f"{len(pending)} of {total} jobs are missing, running, unfinished or interrupted; no table "
            "from a partial sweep:\n  " + "\n  ".join(
                f"{j['job']} ({' '.join(j.get('overrides', j['setting']))}): {j['status']}: {j['error']}"
                for j in pending))


def test_figures(cell: Cell, num_samples: int) -> list[dict]:
    """The chosen runs' test figures: eval.json with the protocol's m; TableError naming runs without."""
    missing = [j["job"] for j in cell.runs if not j["eval"] or j["eval"]["num_samples"] != num_samples]
    if missing:
        raise TableError(f"{cell.latent} {cell.estimator}: no eval.json with m = {num_samples} in "
                         f"{', '.join(missing)}; run gvae-eval eval.num_samples={num_samples} on them")
    return [j["eval"] for j in cell.runs]


# -----------------------------------------------------------------------------
# outputs


def mean_std(values: list[float]) -> str:
    spread = f"{statistics.stdev(values):.2f}" if len(values) > 1 else "—"  # no spread from one seed
    return f"{statistics.fmean(values):.2f} ± {spread}"


def one_value(values: list[Any]) -> str:
    found = sorted({str(v) for v in values})
    return found[0] if len(found) == 1 else "mixed: " + ", ".join(found)


def ranks(values: dict[str, float]) -> dict[str, int]:
    return {k: i for i, k in enumerate(sorted(values, key=lambda k: (values[k], k)), 1)}


BEYOND = "†"  # marks an estimator that is not in the paper's table


def name(cell: Cell) -> str:
    return COLUMNS.get(cell.estimator, f"{cell.estimator}{BEYOND}")


def literal(test: list[dict]) -> str:
    """The literal reading's mean ± std, or "not measured" when a run's record lacks it."""
    if all("test_literal_bound" in f for f in test):
        return mean_std([f["test_literal_bound"] for f in test])
    return "not measured"


def mean_curve(cell: Cell) -> list[tuple[int, float]]:
    """The chosen setting's validation curve, the mean over its seeds at each step."""
    curves = [j["val_curve"] for j in cell.runs]
    steps = [s for s, _ in curves[0]]
    if any([s for s, _ in c] != steps for c in curves):
        raise TableError(f"{cell.latent} {cell.estimator}: seeds evaluated at different steps")
    return [(step, statistics.fmean(v for _, v in points))
            for step, points in zip(steps, zip(*curves, strict=True), strict=True)]


def late_slope(curve: list[tuple[int, float]]) -> float:
    """Least-squares slope of a curve's last quarter of steps, in nats per 10,000 steps."""
    last = curve[-1][0]
    points = [(s, v) for s, v in curve if s >= 0.75 * last]
    if len(points) < 2:
        return math.nan
    mean_s, mean_v = statistics.fmean(s for s, _ in points), statistics.fmean(v for _, v in points)
    num = sum((s - mean_s) * (v - mean_v) for s, v in points)
    return 1e4 * num / sum((s - mean_s) ** 2 for s, _ in points)


FLAT = 1.0  # nats: a curve is flat from the step after which it stays this close to its end


def flat_from(curve: list[tuple[int, float]]) -> int:
    """The first step from which the curve stays within FLAT of its final value (its last step:
    it was still moving more than that at the end)."""
    end = curve[-1][1]
    step = curve[-1][0]
    for at, value in reversed(curve):
        if abs(value - end) > FLAT:
            break
        step = at
    return step


def slope_text(slope: float) -> str:
    return "—" if math.isnan(slope) else f"{slope:+.2f}"  # too few points to fit


WITHIN = 2.0  # nats: a cell this close to the paper's figure needs no explanation
JUDGED = "test_bound"  # the reading the network study (docs/results/network_study) found the paper's fit
FALLING = 0.5  # nats per 10,000 steps: a validation curve falling faster than this at its end is unfinished


def measured_reason(cell: Cell, delta: float) -> str:
    """What the record itself measures about a cell over WITHIN from the paper: its validation curve
    still falling (with the slope), or flat (from when), which rules the budget out as the cause."""
    curve = mean_curve(cell)
    slope, end = late_slope(curve), curve[-1][0]
    falling = slope < -FALLING
    shown = (f"still falling at {end}: {slope_text(slope)} per 10k" if falling
             else f"flat from {flat_from(curve)} ({slope_text(slope)} per 10k)")
    if delta < 0:
        return f"below the paper; {shown}"  # more budget would take it further below
    return shown if falling else f"{shown}: not the budget"


def at_a_glance(cells: list[Cell], figures: dict[int, list[dict]], m: int) -> list[str]:
    """The paper's table laid out as the paper lays it out, each row of figures followed by gvae's
    on the judged reading (the mean over seeds), for the README to quote."""
    measured = {(c.latent, c.estimator): statistics.fmean(f[JUDGED] for f in figures[id(c)])
                for c in cells if c.chosen and all(JUDGED in f for f in figures[id(c)])}
    if not any(key in PAPER_TABLE for key in measured):
        return []
    lines = ["| row | | " + " | ".join(COLUMNS.values()) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for latent, row in PAPER.items():
        ours = [measured.get((latent, est)) for est in COLUMNS]
        if all(v is None for v in ours):
            continue  # a row no sweep of this record trained
        task = latent if latent.startswith("SBN") else f"VAE {latent}"  # the record's rows say SBN only
        lines.append(f"| {task} | paper | " + " | ".join(f"{v:.1f}" for v in row) + " |")
        lines.append(f"| | gvae, test bound (m={m}) | "
                     + " | ".join("not measured" if v is None else f"{v:.1f}" for v in ours) + " |")
    close = [key for key, v in measured.items() if key in PAPER_TABLE and abs(v - PAPER_TABLE[key]) <= WITHIN]
    shown = sum(key in PAPER_TABLE for key in measured)
    within = f"{len(close)} of these {shown} cells lie within {WITHIN:g} nats of the paper's figure."
    return [*lines, "", within]


def distance_to_paper(cells: list[Cell], figures: dict[int, list[dict]], m: int) -> list[str]:
    """Each paper cell's distance (gvae's mean minus the paper's figure) on each figure; a cell more
    than WITHIN nats away on the judged reading is marked, with what its curve shows."""
    rows = [c for c in cells if c.chosen and (c.latent, c.estimator) in PAPER_TABLE]
    if not rows:
        return []
    lines = ["", "## Distance to the paper", "",
             f"gvae's mean minus the paper's figure, per reading (nats). **within {WITHIN:g}**: whether "
             f"the test bound, the reading the network study found the paper's figures fit "
             f"(`docs/results/network_study`), lies within {WITHIN:g} nats of the paper's figure. "
             "**the curve**, for every other cell: what its chosen setting's mean validation curve "
             f"shows, still falling (slope under -{FALLING:g} nats per 10,000 steps over the last quarter) "
             "or flat (from the step it stays within a nat of its end); the notes below say what "
             "further measurements show.", "",
             f"| latent | estimator | paper | Δ test -ELBO | Δ test bound (m={m}) | Δ literal (m={m}) | "
             f"within {WITHIN:g} | the curve |", "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        paper, test = PAPER_TABLE[c.latent, c.estimator], figures[id(c)]
        deltas = {k: statistics.fmean(f[k] for f in test) - paper
                  for k in READINGS if all(k in f for f in test)}
        shown = [f"{deltas[k]:+.2f}" if k in deltas else "not measured" for k in READINGS]
        if JUDGED not in deltas:
            close, reason = "not measured", "—"
        elif abs(deltas[JUDGED]) <= WITHIN:
            close, reason = "yes", "—"
        else:
            close, reason = "**no**", measured_reason(c, deltas[JUDGED])
        lines.append(f"| {c.latent} | {name(c)} | {paper:.1f} | {' | '.join(shown)} | {close} | {reason} |")
    return lines


def halving_rungs(record: dict[str, Any], cells: list[Cell]) -> list[str]:
    """For a halving sweep: per cell, how many settings trained to each rung and which went on."""
    halving = {s["name"]: s["halving"] for s in record["sweeps"] if s.get("halving")}
    if not halving:
        return []
    lines = ["", "## Successive halving", "",
             "Each cell's settings (seed 0) trained to the first rung; at each rung the best ceil(n/eta) "
             "(at least min_kept) by the validation -ELBO at that step went on by resuming; at the last "
             "rung the best alone, "
             "the cell's choice, was then trained with more seeds. "
             + "; ".join(f"`{n}`: rungs {h['rungs']} steps, eta {h['eta']}, at least {h['min_kept']} kept, "
                         f"seeds {h['seeds']}"
                         for n, h in halving.items()) + ".", "",
             "| latent | estimator | settings per rung | choice |", "|---|---|---|---|"]
    for c in cells:
        sweep = halving.get(next(iter(c.settings.values()))[0]["job"].split("/", 1)[0])
        if sweep is None:
            continue
        grid = {j["job"]: j for jobs in c.settings.values() for j in jobs if j.get("grid")}
        decided = halving_decisions(list(grid), grid, HalvingConfig(**sweep)) or []
        counts = " → ".join(f"{len(r.scores)} at {r.steps}" for r in decided)
        lines.append(f"| {c.latent} | {name(c)} | {counts} | {c.label(c.chosen) if c.chosen else '—'} |")
    return lines


def markdown(record: dict[str, Any], cells: list[Cell], notes: str) -> str:
    m = record["num_samples"]
    jobs = record["jobs"]
    complete = [j for j in jobs if j["status"] == "complete"]
    figures = {id(c): test_figures(c, m) for c in cells if c.chosen}  # test figures of chosen runs only
    train_hours = sum(j["metrics"]["wall_seconds"] for j in complete) / 3600
    eval_hours = sum(j["eval"]["wall_seconds"] for j in complete if j["eval"]) / 3600
    steps = one_value(j["metrics"]["step"] for j in complete)
    devices = one_value(j["metrics"]["device_name"] for j in complete)
    sweeps = "; ".join(f"`{s['command']}` ({s['jobs']} jobs, folder `{s['name']}`)" for s in record["sweeps"])
    glance = at_a_glance(cells, figures, m)
    lines = [
        f"# {record['title']}",
        "",
        "Generated by `gvae-table render` from `jobs.json` (every job's record) and "
        "`notes.md`; do not edit by hand.",
        "",
        f"Sweeps: {sweeps}. {len(jobs)} jobs: {len(complete)} complete, {len(jobs) - len(complete)} failed. "
        f"Trained {steps} steps on {devices}; compute: {train_hours:.1f} h of training and "
        f"{eval_hours:.1f} h of evaluation (each run's wall time, summed).",
        "",
        *(["## At a glance", "",
            f"The paper's Table 1 (Jang et al. 2017), each of its rows followed by gvae's test bound "
            f"(m = {m}), the mean over seeds of each cell's chosen setting; the sections below give both "
            "readings, the spread and the distance.", "", *glance, ""] if glance else []),
        "## Test figures beside the paper",
        "",
        "Per cell, the setting with the best mean final validation -ELBO over its seeds (val), chosen "
        "without looking at test figures; then its seeds' test figures, mean ± std over n seeds, with "
        "exact samples and the analytic KL: **test -ELBO**, the single-sample negative ELBO, and "
        f"**test bound**, -log (1/m) Σ p(x, z_i)/q(z_i | x) with m = {m}. Both are upper bounds on "
        "-log p(x). **literal**: -(1/m) Σ log p(x, z_i)/q(z_i | x) over the same samples, the paper's "
        "printed formula read with the log inside the mean (its expectation is the -ELBO's; with the "
        "sampled KL); *not measured* where the record has no such figure. **val slope**: the slope of "
        "the chosen setting's mean validation curve over its last quarter, in nats per 10,000 steps (a "
        "negative slope: still falling); **flat from**: the first step from which that curve stays "
        f"within {FLAT:g} nat of its final value; **passes**: the decoder's passes (a forward and a "
        "backward each) per step and stochastic layer, the cost at which papers compare estimators "
        "(`gvae-train --help`). Paper: Jang et al. (2017), Table 1. Nats, lower is better.",
        "",
        f"| latent | estimator | passes | paper | test -ELBO | test bound (m={m}) | literal (m={m}) | n "
        "| val -ELBO | val slope | flat from | chosen on validation | failed settings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        paper = PAPER_TABLE.get((cell.latent, cell.estimator))
        recorded = [j for jobs in cell.settings.values() for j in jobs if "config" in j]
        passes = decoder_passes(recorded[0]) if recorded else "—"
        head = f"| {cell.latent} | {name(cell)} | {passes} | {'—' if paper is None else f'{paper:.1f}'} |"
        failed = "; ".join(cell.failed_settings()) or "—"
        if cell.chosen is None:
            lines.append(f"{head} all runs failed | — | — | 0 | — | — | — | — | {failed} |")
            continue
        test = figures[id(cell)]
        val = mean_std([j["metrics"]["val_nelbo"] for j in cell.runs])
        lines.append(f"{head} {mean_std([f['test_nelbo'] for f in test])} | "
                     f"{mean_std([f['test_bound'] for f in test])} | {literal(test)} | {len(test)} | {val} | "
                     f"{slope_text(late_slope(mean_curve(cell)))} | {flat_from(mean_curve(cell))} | "
                     f"{cell.label(cell.chosen)} | {failed} |")

    if any(c.estimator not in COLUMNS for c in cells):
        lines += ["", f"{BEYOND} beyond the paper: an estimator published since, trained and chosen by the "
                  "same protocol (it has no figure in Jang et al.'s table)."]

    lines += ["", "## The estimators' order", "",
              "Rank within each latent type (1 = lowest), by the paper's figure and by ours.", "",
              "| latent | estimator | paper | gvae test -ELBO | gvae test bound |", "|---|---|---|---|---|"]
    for latent in sorted({c.latent for c in cells}):
        done = [c for c in cells if c.latent == latent and c.chosen]
        paper = ranks({c.estimator: PAPER_TABLE[latent, c.estimator] for c in done
                       if (latent, c.estimator) in PAPER_TABLE})
        by = {key: ranks({c.estimator: statistics.fmean(f[key] for f in figures[id(c)]) for c in done})
              for key in ("test_nelbo", "test_bound")}
        for c in done:
            lines.append(f"| {latent} | {name(c)} | {paper.get(c.estimator, '—')} | "
                         f"{by['test_nelbo'][c.estimator]} | {by['test_bound'][c.estimator]} |")

    lines += distance_to_paper(cells, figures, m)
    lines += halving_rungs(record, cells)

    relaxed = [c for c in cells if c.chosen and all("test_relaxed_nelbo" in f for f in figures[id(c)])]
    if relaxed:
        lines += ["", "## Relaxed-sample test loss (not a bound)", "",
                  "The decoder fed relaxed samples at the run's final temperature, as "
                  "ericjang/gumbel-softmax#5 reports the paper's figures were reached. The relaxed code is "
                  "not a value of the discrete latent, so this is **not** an upper bound on -log p(x).", "",
                  "| latent | estimator | tau | relaxed test loss | test -ELBO (exact samples) |",
                  "|---|---|---|---|---|"]
        for c in relaxed:
            test = figures[id(c)]
            lines.append(f"| {c.latent} | {name(c)} | {one_value(f['relaxed_tau'] for f in test)} | "
                         f"{mean_std([f['test_relaxed_nelbo'] for f in test])} | "
                         f"{mean_std([f['test_nelbo'] for f in test])} |")

    if notes.strip():
        lines += ["", notes.strip()]

    lines += ["", "## Every job", "",
              "Validation figures only: test figures are read for the chosen settings alone.", "",
              "| job | latent | estimator | setting | seed | status | steps | final val -ELBO "
              "| best val -ELBO |",
              "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        for setting, setting_jobs in cell.settings.items():
            for j in sorted(setting_jobs, key=lambda j: j["seed"]):
                if j["status"] == "complete":
                    metrics = j["metrics"]
                    status, val = "complete", (f"{metrics['step']} | {metrics['val_nelbo']:.2f} | "
                                               f"{metrics['val_nelbo_best']:.2f}")
                else:
                    status, val = f"{j['status']}: {j['error']}", "— | — | —"
                lines.append(f"| {j['job']} | {cell.latent} | {name(cell)} | {cell.label(setting)} | "
                             f"{j['seed']} | {status} | {val} |")
    return "\n".join(lines) + "\n"


def figure(cells: list[Cell], path: Path) -> None:
    """Validation negative ELBO against steps (mean over the chosen setting's seeds), one panel per
    latent type, and the final test negative ELBO as a marker: the paper's Figure 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latents = sorted({c.latent for c in cells})
    fig, axes = plt.subplots(1, len(latents), figsize=(6 * len(latents), 4.5), squeeze=False)
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(sorted({c.estimator for c in cells}))}
    for ax, latent in zip(axes[0], latents, strict=True):
        for cell in (c for c in cells if c.latent == latent and c.chosen):
            steps, mean = zip(*mean_curve(cell), strict=True)
            color = colors[cell.estimator]
            ax.plot(steps, mean, label=name(cell), color=color)
            test = statistics.fmean(j["eval"]["test_nelbo"] if j["eval"] else j["metrics"]["test_nelbo"]
                                    for j in cell.runs)
            ax.plot([steps[-1]], [test], "x", color=color)
        ax.set_ylim(top=min(ax.get_ylim()[1], 200.0))  # the first evaluations would squash the curves
        label_curves(ax, f"{latent}: validation (lines), test (x)")
    save_figure(fig, path)


def label_curves(ax, title: str) -> None:
    """An axes of negative-ELBO curves against steps: its title, labels, grid and legend."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("negative ELBO (nats)")
    ax.grid(alpha=0.3)
    ax.legend()


def save_figure(fig, path: Path) -> None:
    """PNG bytes that depend on the figure alone (no software version stamp): committed, regenerated."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def render(out: Path) -> str:
    """results.md and figure.png in `out` from its jobs.json (and notes.md); returns the markdown."""
    record = read_json(out / "jobs.json")
    if record is None:
        raise TableError(f"{out / 'jobs.json'} does not exist: run `gvae-table record` first")
    check_finished(record)
    cells = select(record)
    notes_path = out / "notes.md"
    text = markdown(record, cells, notes_path.read_text() if notes_path.is_file() else "")
    figure(cells, out / "figure.png")
    atomic_write(out / "results.md", lambda f: f.write(text.encode()))
    return text


def chosen_folders(sweep_dirs: list[Path]) -> tuple[list[str], list[str]]:
    """(folders of the chosen settings' runs, cells not ready to choose and why)."""
    record = read_sweeps(sweep_dirs)
    by_name = {d.name: d for d in sweep_dirs}
    if missing := [j for j in record["jobs"] if j["status"] == "missing"]:
        return [], [f"{len(missing)} jobs not started yet, so no cell's settings are known to be complete"]
    cells = select(record)
    folders, waiting = [], []
    for cell in cells:
        pending = [j for s in cell.settings.values() for j in s if j["status"] not in FINAL]
        if pending:
            waiting.append(f"{cell.latent} {cell.estimator}: {len(pending)} jobs not finished")
        elif cell.chosen:
            for j in cell.runs:
                name, _, rel = j["job"].partition("/")
                folders.append(str(by_name[name] / rel))
    return folders, waiting


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gvae-table", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="read sweeps into OUT/jobs.json, then render it if complete")
    rec.add_argument("sweeps", type=Path, nargs="+", help="multirun folders (each holds multirun.yaml)")
    rec.add_argument("--out", type=Path, required=True, help="the protocol's results folder")
    rec.add_argument("--num-samples", type=int, default=1000, help="m of the reported test bound (1000)")
    rec.add_argument("--title", default="Table 1 (VAE rows): test negative ELBO, gvae beside the paper")
    ren = sub.add_parser("render", help="results.md and figure.png from OUT/jobs.json")
    ren.add_argument("out", type=Path)
    cho = sub.add_parser("chosen", help="print the run folders of each cell's chosen setting")
    cho.add_argument("sweeps", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        import_extensions()  # $GVAE_IMPORT's estimators, which the jobs' configs and checkpoints name
        if args.command == "chosen":
            folders, waiting = chosen_folders(args.sweeps)
            for line in waiting:
                print(f"not chosen yet: {line}", file=sys.stderr)
            print("\n".join(folders))
            return 0
        if args.command == "record":
            record = {"title": args.title, "num_samples": args.num_samples, **read_sweeps(args.sweeps)}
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / "jobs.json", record, indent=None)  # hundreds of jobs' curves: keep it small
            done = sum(j["status"] in FINAL for j in record["jobs"])
            print(f"wrote {args.out / 'jobs.json'}: {done} of {len(record['jobs'])} jobs finished")
        text = render(args.out)
    except GvaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'figure.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
