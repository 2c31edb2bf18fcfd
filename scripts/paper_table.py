"""The paper's Table 1 (VAE rows) and Figure 4 from a sweep, beside the paper's numbers.

    gvae-train -m experiment=paper_sweep
    python scripts/paper_table.py outputs/multirun/DATE/TIME --out docs/results

Reads every job folder of a Hydra multirun (.hydra/config.yaml, .hydra/overrides.yaml,
metrics.json, the TensorBoard events), groups the runs by (latent type, estimator) and, in each
group, picks the setting (a job's overrides other than the seed) with the best mean validation
negative ELBO over seeds, as the paper picked hyperparameters on validation. Writes
results.md (the test bound of that setting, mean ± std over its seeds, beside the paper's
number, with the chosen hyperparameters) and figure.png (validation negative ELBO against
steps per estimator, with the final test negative ELBO, as the paper's Figure 4).

Exits with status 1, naming the job folders, when any job of the sweep is missing or did not
complete: a partial average is never reported as if it were complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gvae.config import Config

# Table 1 of Jang et al. (2017), VAE rows: test negative ELBO in nats, m = 1000.
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
}
PAPER_TABLE = {(latent, est): v for latent, row in PAPER.items() for est, v in zip(COLUMNS, row, strict=True)}
METRIC_KEYS = ("status", "step", "val_nelbo_best", "test_nelbo", "test_bound", "num_samples")


class IncompleteSweep(Exception):
    """Some jobs of the sweep are missing or did not complete; the message names them."""


@dataclasses.dataclass
class Run:
    folder: Path
    setting: tuple[str, ...]  # the job's overrides other than the seed
    seed: int
    latent: str  # e.g. "categorical (20x10)"
    estimator: str
    config: dict[str, Any]  # resolved, flattened: {"optim.lr": 0.001, ...}
    metrics: dict[str, Any]


# -----------------------------------------------------------------------------
# reading a sweep


def expected_jobs(sweep_dir: Path) -> list[frozenset[str]]:
    """The overrides of every job the sweep launches: the product of its swept values, as Hydra's
    basic sweeper forms it from hydra.sweeper.params and the command line (which wins per key)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        raise IncompleteSweep(f"{path} is missing: not the folder of a Hydra multirun")
    hydra_cfg = OmegaConf.load(path).hydra
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.params or {}).items()]
    by_key: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides([*params, *hydra_cfg.overrides.task]):
        key = override.get_key_element()
        if override.is_sweep_override():
            by_key[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            by_key[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [frozenset(job) for job in itertools.product(*by_key.values())]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, child in node.items() for k, v in flatten(child, f"{prefix}{key}.").items()}


def latent_label(model: dict[str, Any]) -> str:
    if model["latent"] == "bernoulli":
        return f"Bernoulli ({model['num_vars']})"
    return f"categorical ({model['num_vars']}x{model['num_classes']})"


def problem(folder: Path) -> str | None:
    """Why this job folder holds no complete run, or None."""
    failed = folder / "failed.json"
    if failed.is_file():
        return f"failed: {json.loads(failed.read_text()).get('error', 'no message')}"
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        return "no metrics.json (crashed, killed or still running)"
    data = json.loads(metrics.read_text())
    missing = [k for k in METRIC_KEYS if k not in data]
    if missing or data["status"] != "complete":
        return f"incomplete metrics.json (status {data.get('status')!r}, missing {missing})"
    if not all(math.isfinite(data[k]) for k in ("val_nelbo_best", "test_nelbo", "test_bound")):
        return "non-finite metrics"
    return None


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every job of the sweep; IncompleteSweep naming each missing or incomplete job."""
    expected = expected_jobs(sweep_dir)
    folders = sorted((p.parent.parent for p in sweep_dir.glob("**/.hydra/config.yaml")), key=str)
    found = {frozenset(OmegaConf.load(f / ".hydra" / "overrides.yaml")): f for f in folders}
    errors = [f"{f}: {why}" for f in folders if (why := problem(f))]
    errors += [f"missing job: {' '.join(sorted(job))}" for job in expected if job not in found]
    if errors:
        raise IncompleteSweep(
            f"{len(errors)} of {len(expected)} jobs in {sweep_dir} are missing or incomplete; "
            "no table from a partial sweep:\n  " + "\n  ".join(errors)
        )
    runs = []
    for overrides, folder in found.items():
        cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
        cfg = OmegaConf.to_container(cfg, resolve=True)
        runs.append(Run(
            folder=folder,
            setting=tuple(sorted(o for o in overrides if not o.startswith("seed="))),
            seed=cfg["seed"], latent=latent_label(cfg["model"]), estimator=cfg["estimator"]["name"],
            # Only the trainer's own keys: a sweep may add helper keys (paper_sweep's +row).
            config=flatten({k: cfg[k] for k in (f.name for f in dataclasses.fields(Config))}),
            metrics=json.loads((folder / "metrics.json").read_text()),
        ))
    return runs


def validation_curve(folder: Path) -> tuple[list[int], list[float]]:
    """The val/nelbo scalars of a run's event files: (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1})
    events.Reload()
    if "val/nelbo" not in events.Tags()["scalars"]:
        raise IncompleteSweep(f"{folder}: no val/nelbo scalars in its event files")
    points = events.Scalars("val/nelbo")
    return [p.step for p in points], [p.value for p in points]


# -----------------------------------------------------------------------------
# selection on validation


@dataclasses.dataclass
class Row:
    latent: str
    estimator: str
    runs: list[Run]  # the chosen setting's runs, one per seed
    chosen: dict[str, Any]  # its hyperparameters that were searched

    def mean(self, key: str) -> float:
        return statistics.fmean(r.metrics[key] for r in self.runs)

    def std(self, key: str) -> float:
        return statistics.stdev(r.metrics[key] for r in self.runs) if len(self.runs) > 1 else float("nan")


def mean_val(runs: list[Run]) -> float:
    return statistics.fmean(r.metrics["val_nelbo_best"] for r in runs)


def select(runs: list[Run]) -> list[Row]:
    """Per (latent, estimator): the setting with the best mean validation negative ELBO over seeds."""
    groups: dict[tuple[str, str], dict[tuple[str, ...], list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.latent, run.estimator][run.setting].append(run)
    rows = []
    for (latent, estimator), settings in groups.items():
        for setting_runs in settings.values():
            seeds = [r.seed for r in setting_runs]
            if len(set(seeds)) != len(seeds):
                folders = ", ".join(str(r.folder) for r in setting_runs)
                raise IncompleteSweep(f"the same setting and seed run twice: {folders}")
        best = min(settings.values(), key=mean_val)
        # The searched hyperparameters: trainer keys whose value differs between this group's settings.
        configs = [rs[0].config for rs in settings.values()]
        searched = sorted(k for k in configs[0] if k != "seed" and len({repr(c.get(k)) for c in configs}) > 1)
        rows.append(Row(latent, estimator, sorted(best, key=lambda r: r.seed),
                        {k: best[0].config[k] for k in searched}))
    order = {name: i for i, name in enumerate(COLUMNS)}
    return sorted(rows, key=lambda r: (r.latent, order.get(r.estimator, len(order)), r.estimator))


# -----------------------------------------------------------------------------
# outputs


def one_value(runs: list[Run], key: str) -> str:
    values = sorted({str(r.metrics.get(key)) for r in runs})
    return values[0] if len(values) == 1 else "mixed: " + ", ".join(values)


def markdown(rows: list[Row], runs: list[Run], sweep_dir: Path, command: str) -> str:
    lines = [
        "# Table 1 (VAE rows): test negative ELBO, gvae beside the paper",
        "",
        f"Sweep `{sweep_dir}`: {len(runs)} runs, all complete. Command: `{command}`.",
        f"Trained {one_value(runs, 'step')} steps on {one_value(runs, 'device_name')}.",
        "",
        "gvae: the test bound -log (1/m) Σ_i p(x, z_i) / q(z_i | x) with "
        f"m = {one_value(runs, 'num_samples')} (the paper: m = 1000), mean ± std over the seeds (n) "
        "of the setting with the best mean validation negative ELBO (val, the best over training). "
        "Paper: Jang et al. (2017), Table 1, quoted only where the latent has the paper's size. "
        "Nats, lower is better.",
        "",
        "| latent | estimator | paper | gvae | n | val | chosen on validation |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        paper = PAPER_TABLE.get((row.latent, row.estimator))
        chosen = ", ".join(f"{k}={v}" for k, v in row.chosen.items()) or "(one setting)"
        spread = f"{row.std('test_bound'):.2f}" if len(row.runs) > 1 else "—"  # no spread from one seed
        lines.append(
            f"| {row.latent} | {COLUMNS.get(row.estimator, row.estimator)} | "
            f"{'—' if paper is None else f'{paper:.1f}'} | "
            f"{row.mean('test_bound'):.2f} ± {spread} | {len(row.runs)} | "
            f"{row.mean('val_nelbo_best'):.2f} | {chosen} |"
        )
    return "\n".join(lines) + "\n"


def figure(rows: list[Row], path: Path) -> None:
    """Validation negative ELBO against steps (mean over seeds), one panel per latent type, and the
    final test negative ELBO as a marker: the paper's Figure 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latents = sorted({r.latent for r in rows})
    fig, axes = plt.subplots(1, len(latents), figsize=(6 * len(latents), 4.5), squeeze=False)
    for ax, latent in zip(axes[0], latents, strict=True):
        for row in (r for r in rows if r.latent == latent):
            curves = [validation_curve(run.folder) for run in row.runs]
            steps = curves[0][0]
            if any(c[0] != steps for c in curves):
                raise IncompleteSweep(f"{latent} {row.estimator}: seeds evaluated at different steps")
            mean = [statistics.fmean(vals) for vals in zip(*(c[1] for c in curves), strict=True)]
            label = COLUMNS.get(row.estimator, row.estimator)
            (line,) = ax.plot(steps, mean, label=label)
            ax.plot([row.runs[0].metrics["step"]], [row.mean("test_nelbo")], "x", color=line.get_color())
        ax.set_title(f"{latent}: validation (lines), test (x)")
        ax.set_xlabel("step")
        ax.set_ylabel("negative ELBO (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (holds multirun.yaml)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"),
                        help="where results.md and figure.png go (default: docs/results)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("figure.png needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 1
    try:
        runs = load_runs(args.sweep_dir)
        rows = select(runs)
        task = OmegaConf.load(args.sweep_dir / "multirun.yaml").hydra.overrides.task
        table = markdown(rows, runs, args.sweep_dir, shlex.join(["gvae-train", "-m", *task]))
        args.out.mkdir(parents=True, exist_ok=True)
        figure(rows, args.out / "figure.png")
    except IncompleteSweep as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    (args.out / "results.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'figure.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
