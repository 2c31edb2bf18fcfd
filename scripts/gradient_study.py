"""Every estimator's gradient on one trained model, against one reference: bias and variance side
by side, and across temperatures for the estimators that have one.

    python scripts/gradient_study.py RUN_DIR --out docs/results/gradients_20x10
    python scripts/gradient_study.py RUN_DIR --out DIR --estimators gumbel_softmax rebar --draws 500

Loads the run's checkpoint (weights_only) and config, takes the first `--batch` validation
images, computes the reference gradient of the objective with respect to the encoder's logits
once (exact when the codes per image are at most --max-codes, else the local expectation
gradient with its standard error; gvae/diagnostics.py), then draws each estimator's gradient
`--draws` times with its default options at the run's final temperature (a learned control
variate first trained on its variance, `--adapt` steps). Writes study.md (the
table), study.json (every figure) and study.png (bias against variance; bias and variance against
the temperature). Seeded: the same command gives the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from gvae.config import DiagConfig
from gvae.data import load_splits
from gvae.diagnostics import estimator_draws, reference_gradient, summarize
from gvae.estimators import ESTIMATORS
from gvae.files import atomic_write, write_json
from gvae.runs import load_model, run_config

# Rows beyond the registered names: an estimator with options that change what it computes.
VARIANTS = {"rebar_learned": ("rebar", {"learn": True})}


def registered(name: str) -> str:
    return VARIANTS[name][0] if name in VARIANTS else name


def build(name: str, model, follow_tau: bool = False):
    """The estimator (or variant) with its default options; with follow_tau, any own temperature option
    (ReinMax's tau, the decoupled estimator's backward_tau) set to follow the given temperature instead."""
    base, options = VARIANTS.get(name, (name, {}))
    cfg = ESTIMATORS[base].config(**options)
    if follow_tau:
        cfg = dataclasses.replace(cfg, **{f: None for f in ("tau", "backward_tau") if hasattr(cfg, f)})
    return model.build_estimator(cfg)


def adapt(model, estimator: torch.nn.Module, x: torch.Tensor, tau: float, steps: int,
          copies: int = 8) -> None:
    """Train a learned control variate (its own parameters only, the model held fixed) on its variance
    objective for `steps` Adam steps on `copies` copies of the batch, as training would have: at its
    starting values it is only its fixed form."""
    optimizer = torch.optim.Adam(estimator.parameters(), lr=3e-3)
    with torch.no_grad():
        logits = model.diag_logits(x)
    for _ in range(steps):
        batch = logits.repeat(copies, *[1] * (logits.dim() - 1)).requires_grad_()
        objective = model.diag_objective(estimator, batch, x.repeat(copies, 1), torch.tensor(tau))
        optimizer.zero_grad()
        objective.mean().backward()  # the estimator's parameters receive the variance's gradient
        optimizer.step()


def study(run_dir: Path, names: list[str], draws: int, batch: int, taus: list[float], max_codes: int,
          reference_draws: int, seed: int, adapt_steps: int) -> dict:
    cfg = run_config(run_dir, ["device=cpu"])
    model, step, _ = load_model(run_dir, cfg, torch.device("cpu"))
    splits = load_splits(cfg.data, torch.device("cpu"))
    x = splits.eval_targets(splits.val[:batch])
    latent_type = cfg.model.latent.value
    names = [n for n in names if latent_type in ESTIMATORS[registered(n)].config.latents]
    # The study's objective is the single-sample one; an estimator of another objective is named, not drawn.
    left_out = {n: "trains the K-sample bound (task.objective=iwae): its gradient is of another objective"
                for n in names if "elbo" not in ESTIMATORS[registered(n)].objectives}
    names = [n for n in names if n not in left_out]
    tau = cfg.schedule.temperature(step)
    torch.manual_seed(seed)
    reference, reference_se, kind = reference_gradient(
        model, x, DiagConfig(max_codes=max_codes, reference_draws=reference_draws))
    rows = {}
    for name in names:
        torch.manual_seed(seed)
        estimator = build(name, model)
        if any(True for _ in estimator.parameters()):
            adapt(model, estimator, x, tau, adapt_steps)
        rows[name] = summarize(estimator_draws(model, estimator, x, tau, draws), reference, reference_se)
    sweep = {}
    for name in (n for n in names if ESTIMATORS[registered(n)].config.uses_temperature):
        sweep[name] = {}
        for t in taus:
            torch.manual_seed(seed)
            estimator = build(name, model, follow_tau=True)
            draws_t = estimator_draws(model, estimator, x, t, draws)
            sweep[name][str(t)] = summarize(draws_t, reference, reference_se)
    model_text = (f"{cfg.model.num_classes} classes x {cfg.model.num_vars} variables (categorical)"
                  if latent_type == "categorical" else f"{cfg.model.num_vars} binary units")
    return {"run": str(run_dir), "step": step, "model": model_text,
            "estimator_trained_with": cfg.estimator.name, "temperature": tau, "reference": kind,
            "draws": draws, "batch": batch, "seed": seed,
            "reference_draws": reference_draws if kind != "exact" else None, "estimators": rows,
            "temperature_sweep": sweep, "adapt_steps": adapt_steps, "left_out": left_out}


def markdown(record: dict) -> str:
    ref = record["reference"] + ("" if record["reference"] == "exact"
                                 else f" ({record['reference_draws']} draws)")
    lines = [
        f"# Gradient study: {record['model']}, trained with {record['estimator_trained_with']} "
        f"for {record['step']} steps",
        "",
        f"Generated by `python scripts/gradient_study.py` from `{record['run']}` (its checkpoint). Each "
        f"estimator's gradient of the objective with respect to the encoder's logits, {record['draws']} "
        f"draws on the first {record['batch']} validation images, at the run's final temperature "
        f"{record['temperature']:.3g}, against the {ref} gradient. bias: |mean - reference| / |reference|; "
        "noise: what that ratio would be for an unbiased estimator, from the draws' and the reference's "
        "own noise; variance: trace of one draw's covariance per image; cosine of the mean with the "
        "reference; snr: |mean| / sqrt(variance). A bias well above its noise is a real bias. The "
        "score-function estimators (score_function, darn, muprop) deliver their gradient times their "
        "variance normalization's scale (here a fresh estimator's, from the draws' own spread): most "
        "of their 'bias' is that scale, and their cosine shows their direction." + (
            " The estimators with a learned control variate (relax, rebar_learned: rebar with `learn`) "
            f"first train it on its variance objective alone, {record['adapt_steps']} Adam steps on "
            "copies of the batch with the model held fixed." if "adapt_steps" in record else ""),
        *[f"Not drawn: {name}, which {why}." for name, why in sorted(record.get("left_out", {}).items())],
        "",
        "| estimator | bias | noise | variance | cosine | snr |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in sorted(record["estimators"].items(), key=lambda item: item[1]["bias"]):
        lines.append(f"| {name} | {f['bias']:.3f} | {f['bias_noise']:.3f} | {f['variance']:.4g} | "
                     f"{f['cosine']:.3f} | {f['snr']:.3f} |")
    if record["temperature_sweep"]:
        taus = list(next(iter(record["temperature_sweep"].values())))
        lines += ["", "Across temperatures (bias / variance), the estimators whose gradient has one "
                  "(ReinMax's and the decoupled estimator's own temperature set to follow it):", "",
                  "| estimator | " + " | ".join(f"tau={t}" for t in taus) + " |",
                  "|---|" + "---|" * len(taus)]
        for name, by_tau in record["temperature_sweep"].items():
            cells = [f"{by_tau[t]['bias']:.3f} / {by_tau[t]['variance']:.3g}" for t in taus]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for name, f in record["estimators"].items():
        ax.scatter(f["variance"], f["bias"], s=30)
        ax.annotate(name, (f["variance"], f["bias"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.plot([f["variance"]] * 2, [f["bias_noise"] * 0.999, f["bias_noise"]], "k_", ms=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("variance (trace of one draw's covariance, per image)")
    ax.set_ylabel("relative bias |mean - reference| / |reference|")
    ax.set_title(f"{record['model']}: bias against variance (tau {record['temperature']:.3g}; - : noise)")
    ax.grid(alpha=0.3, which="both")
    for ax, key, label in ((axes[1], "bias", "relative bias"), (axes[2], "variance", "variance")):
        for name, by_tau in record["temperature_sweep"].items():
            taus = [float(t) for t in by_tau]
            ax.plot(taus, [by_tau[t][key] for t in by_tau], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("temperature tau")
        ax.set_ylabel(label)
        ax.set_title(f"{label} against the temperature")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help="a finished run folder")
    parser.add_argument("--render", action="store_true",
                        help="only write study.md and study.png again from OUT/study.json")
    parser.add_argument("--out", type=Path, required=True, help="where study.md, study.json, study.png go")
    parser.add_argument("--estimators", nargs="+", default=sorted([*ESTIMATORS, *VARIANTS]),
                        help=f"default: all registered, and {', '.join(VARIANTS)}")
    parser.add_argument("--adapt", type=int, default=500,
                        help="steps training a learned control variate before its draws")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--max-codes", type=int, default=4096)
    parser.add_argument("--reference-draws", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.estimators) - set(ESTIMATORS) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown estimators {unknown}; registered: {sorted(ESTIMATORS)}; "
                     f"variants: {sorted(VARIANTS)}")
    if args.render:
        record = json.loads((args.out / "study.json").read_text())
    elif args.run is None:
        parser.error("a run folder, or --render with --out holding a study.json")
    else:
        record = study(args.run, args.estimators, args.draws, args.batch, args.taus, args.max_codes,
                       args.reference_draws, args.seed, args.adapt)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "study.json", record)
    text = markdown(record)
    atomic_write(args.out / "study.md", lambda f: f.write(text.encode()))
    figure(record, args.out / "study.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
