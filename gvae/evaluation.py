"""The figures a run is judged by, computed one way during training, at its end and by gvae-eval.

Each task (gvae/tasks/) gives its figures per example; here they are averaged over a split. Every
figure uses exact (one-hot or binary) samples, so each is an upper bound on the negative
log-likelihood (in expectation over the samples), except `test_relaxed_nelbo`, which says so:
- `{split}_nelbo`: the mean single-sample figure over the split (the VAE's negative ELBO with the
  analytic KL).
- `test_bound`: -log (1/m) sum_i w_i with the task's importance weights w_i (the VAE's p(x, z_i) /
  q(z_i | x), Burda et al. 2016), m = eval.num_samples: the log of the mean, the reading of the
  paper's m = 1000 figure that later papers on its benchmark use (MuProp, ARM).
- `test_literal_bound`: -(1/m) sum_i log w_i over the same m samples: the paper's printed formula
  (Section 4.1) read literally, log inside the mean. Its expectation is the single-sample figure's
  for every m (m only lowers its variance), so it is never below `test_bound` on the same samples.
- `test_relaxed_nelbo`: the single-sample figure with relaxed samples at temperature tau (what a
  relaxed estimator's training loss measures, and what ericjang/gumbel-softmax#5 reports the
  paper's figures were reached with). Not a bound on anything.
Evaluation noise comes from its own generator with a fixed seed, so figures are repeatable and
the training random stream is untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from gvae.config import Config, EvalConfig, import_extensions, resolve_device
from gvae.data import Splits, load_splits
from gvae.errors import ConfigError, GvaeError
from gvae.files import write_json
from gvae.run_folder import FolderBusy, RunFolder
from gvae.runs import find_runs, load_model, read_json, run_config, unfinished
from gvae.tasks import Task

log = logging.getLogger(__name__)

EVAL_SEED = 1234


def eval_generator(device: torch.device) -> torch.Generator:
    """A fresh generator with a fixed seed, apart from the training stream."""
    return torch.Generator(device=device).manual_seed(EVAL_SEED)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    """A bar over images, shown only on a terminal (disable=None) and only when asked for."""
    return tqdm(total=total, desc=desc, unit="img", disable=None if progress else True,
                dynamic_ncols=True, leave=False)


Targets = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int], object] | None  # called with the number of images just done


@torch.no_grad()
def negative_elbo(
    model: Task, images: torch.Tensor, targets: Targets, batch_size: int,
    generator: torch.Generator | None = None, progress: Progress = None,
) -> torch.Tensor:
    """Mean over images of the task's single-sample figure with exact samples: a bound.

    Returns a device scalar so that callers decide when to synchronise.
    """
    total = torch.zeros((), device=images.device)
    for i in range(0, len(images), batch_size):
        x = targets(images[i : i + batch_size])
        total += model.nelbo(x, generator).sum()
        if progress:
            progress(len(x))
    return total / len(images)


@torch.no_grad()
def relaxed_negative_elbo(
    model: Task, images: torch.Tensor, targets: Targets, batch_size: int, tau: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean over images of the single-sample figure with relaxed samples at temperature tau. NOT a
    bound: a relaxed code is not a value of the discrete latent."""
    total = torch.zeros((), device=images.device)
    for i in range(0, len(images), batch_size):
        total += model.relaxed_nelbo(targets(images[i : i + batch_size]), tau, generator).sum()
    return total / len(images)


@torch.no_grad()
def multi_sample_bounds(
    model: Task, images: torch.Tensor, targets: Targets, num_samples: int, max_rows: int,
    generator: torch.Generator | None = None, progress: Progress = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both readings of the m-sample figure, m = num_samples, from one set of the task's log
    weights log w_i of exact samples, each a mean over images:
    (-log (1/m) sum_i w_i (Burda et al. 2016), -(1/m) sum_i log w_i (the paper's formula read literally)).

    At most `max_rows` (image, sample) pairs go through the networks at once; samples of one image
    are split over several passes when m alone exceeds it, combined with a running logsumexp.
    """
    samples_per_pass = min(num_samples, max_rows)
    images_per_pass = max(1, max_rows // samples_per_pass)
    log_mean = torch.zeros((), device=images.device)
    mean_log = torch.zeros((), device=images.device)
    for i in range(0, len(images), images_per_pass):
        x = targets(images[i : i + images_per_pass])
        log_sum = torch.full((x.shape[0],), -math.inf, device=x.device)
        for done in range(0, num_samples, samples_per_pass):
            m = min(samples_per_pass, num_samples - done)
            log_w = model.log_weights(x, m, generator)
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, dim=0))
            mean_log -= log_w.sum() / num_samples
        log_mean -= (log_sum - math.log(num_samples)).sum()
        if progress:
            progress(len(x))
    return log_mean / len(images), mean_log / len(images)


def multi_sample_bound(
    model: Task, images: torch.Tensor, targets: Targets, num_samples: int, max_rows: int,
    generator: torch.Generator | None = None, progress: Progress = None,
) -> torch.Tensor:
    """Mean of -log (1/m) sum_i w_i over images (multi_sample_bounds' first reading)."""
    return multi_sample_bounds(model, images, targets, num_samples, max_rows, generator, progress)[0]


def split_nelbo(model: Task, splits: Splits, split: str, cfg: EvalConfig, progress: bool = False) -> float:
    """Mean single-sample negative ELBO over `split` ("val" or "test")."""
    images = getattr(splits, split)
    with _bar(len(images), f"{split} -ELBO", progress) as bar:
        return negative_elbo(model, images, splits.eval_targets, cfg.batch_size,
                             eval_generator(images.device), bar.update).item()


def test_bounds(model: Task, splits: Splits, cfg: EvalConfig, progress: bool = False) -> dict[str, float]:
    """Both readings of the m-sample figure on the test set, m = cfg.num_samples:
    {"test_bound": log of the mean, "test_literal_bound": mean of the logs}."""
    with _bar(len(splits.test), f"test bound m={cfg.num_samples}", progress) as bar:
        log_mean, mean_log = multi_sample_bounds(model, splits.test, splits.eval_targets, cfg.num_samples,
                                                 cfg.max_rows, eval_generator(splits.test.device), bar.update)
    return {"test_bound": log_mean.item(), "test_literal_bound": mean_log.item()}


def evaluate(
    model: Task, splits: Splits, cfg: EvalConfig, splits_to_score: tuple[str, ...] = ("val", "test"),
    bound: bool = True, relaxed_tau: float | None = None, progress: bool = False,
) -> dict[str, float]:
    """Named figures: `{split}_nelbo` for each split, `test_bound` and `test_literal_bound` if `bound`,
    and `test_relaxed_nelbo` at temperature `relaxed_tau` if given. The model is left in train mode."""
    model.eval()
    try:
        figures = {f"{s}_nelbo": split_nelbo(model, splits, s, cfg, progress) for s in splits_to_score}
        if bound:
            figures.update(test_bounds(model, splits, cfg, progress))
        if relaxed_tau is not None:
            figures["test_relaxed_nelbo"] = relaxed_negative_elbo(
                model, splits.test, splits.eval_targets, cfg.batch_size, relaxed_tau,
                eval_generator(splits.test.device)).item()
        return figures
    finally:
        model.train()


# -----------------------------------------------------------------------------
# gvae-eval: evaluate finished runs from their folders

def evaluate_run(run_dir: Path, overrides: list[str], force: bool = False) -> dict[str, Any] | str:
    """Evaluate one finished run and write eval.json and TensorBoard scalars into its folder, holding
    the folder's lock meanwhile (a live run there is refused: its checkpoint is still changing).
    Returns the record, or a string saying why the run was skipped."""
    cfg = run_config(run_dir, overrides)  # only the keys evaluation may set (gvae/roles.py)
    try:
        with RunFolder(run_dir):
            return _evaluate_locked(run_dir, cfg, force)
    except FolderBusy as e:
        return f"{e} (it is evaluated once it has finished)"


def _evaluate_locked(run_dir: Path, cfg: Config, force: bool) -> dict[str, Any] | str:
    if why := unfinished(run_dir):
        return why
    if not os.access(run_dir, os.W_OK):  # found before the evaluation, not after it
        return f"{run_dir} is not writable: eval.json could not be written there"
    eval_settings = dataclasses.asdict(cfg.eval)
    previous = read_json(run_dir / "eval.json")
    device = resolve_device(cfg.device)
    model, step, digest = load_model(run_dir, cfg, device)
    if (not force and previous and previous.get("step") == step and previous.get("eval") == eval_settings
            and previous.get("checkpoint_sha256") == digest):
        return "already evaluated with these settings (eval.json; --force evaluates again)"
    log.info("%s: step %d, m = %d, on %s", run_dir, step, cfg.eval.num_samples, device)
    t0 = time.perf_counter()
    splits = load_splits(cfg.data, device)
    tau = cfg.schedule.temperature(step) if cfg.eval.relaxed else None
    figures = evaluate(model, splits, cfg.eval, ("val", "test"), bound=True, relaxed_tau=tau, progress=True)
    record = {
        "step": step, "checkpoint_sha256": digest, **figures, "num_samples": cfg.eval.num_samples,
        **({"relaxed_tau": tau} if tau is not None else {}),
        "eval": eval_settings, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "wall_seconds": time.perf_counter() - t0,
    }
    write_json(run_dir / "eval.json", record)
    with SummaryWriter(str(run_dir)) as writer:  # beside the training events: one run in TensorBoard
        writer.add_scalar("eval/val_nelbo", figures["val_nelbo"], step)
        writer.add_scalar("eval/test_nelbo", figures["test_nelbo"], step)
        writer.add_scalar(f"eval/test_bound_m{cfg.eval.num_samples}", figures["test_bound"], step)
        writer.add_scalar(f"eval/test_literal_bound_m{cfg.eval.num_samples}", figures["test_literal_bound"],
                          step)
        if tau is not None:
            relaxed = next(f for f in model.FIGURES if f.key == "relaxed_nelbo")
            tag = "eval/test_relaxed_nelbo" + ("" if relaxed.bound else "_not_a_bound")
            writer.add_scalar(tag, figures["test_relaxed_nelbo"], step)
    return record


def fits(run_dir: Path) -> bool:
    """Whether the run's own config reads and checks (without any override)."""
    try:
        run_config(run_dir)
    except GvaeError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gvae-eval",
        description="Evaluate finished gvae runs from their folders: validation and test negative "
        "ELBO and the m-sample test bound, with each run's own config and checkpoint. Writes "
        "eval.json in each run folder (metrics.json stays as training wrote it) and eval/* scalars "
        "to its TensorBoard events.",
        epilog="examples:\n  gvae-eval outputs/runs/2026-11-28/10-00-00\n"
        "  gvae-eval outputs/multirun/2026-11-28/10-00-00 eval.num_samples=1000 device=cpu\n"
        "  gvae-eval RUN eval.relaxed=true   # also the relaxed-sample test loss (not a bound)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("items", nargs="+", metavar="RUN_OR_SWEEP | key=value",
                        help="run folders, sweep folders (every job in them), and overrides of the keys "
                        "evaluation may set (eval.*, device, where the data are: gvae/roles.py)")
    parser.add_argument("--force", action="store_true", help="evaluate runs that eval.json says are done")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # An existing folder is a folder, even with "=" in its name; anything else with "=" is an override.
    paths = [Path(a) for a in args.items if Path(a).is_dir() or "=" not in a]
    overrides = [a for a in args.items if Path(a) not in paths]
    if not paths:
        parser.error("no run or sweep folder given (only overrides: " + " ".join(overrides) + ")")
    try:
        import_extensions()
        runs = find_runs(paths)
    except GvaeError as e:
        log.error("error: %s", e)
        return 1
    skipped = 0
    for i, run_dir in enumerate(runs, 1):
        try:
            result = evaluate_run(run_dir, overrides, args.force)
        except ConfigError as e:
            if overrides and fits(run_dir):  # the overrides are wrong, for every run: stop
                log.error("error: %s", e)
                return 1
            result = f"error: {e}"  # this run's own record is wrong: the others go on
        except (GvaeError, OSError) as e:
            result = f"error: {e}"
        if isinstance(result, str):
            skipped += not result.startswith("already")
            log.warning("[%d/%d] %s skipped: %s", i, len(runs), run_dir, result)
        else:
            log.info("[%d/%d] %s: val -ELBO %.2f, test -ELBO %.2f, test bound (m=%d) %.2f, literal %.2f", i,
                     len(runs), run_dir, result["val_nelbo"], result["test_nelbo"], result["num_samples"],
                     result["test_bound"], result["test_literal_bound"])
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
