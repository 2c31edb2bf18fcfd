"""The figures a run is judged by, computed one way during training, at its end and by gvae-eval.

Every figure uses exact (one-hot or binary) samples and the analytic KL, so each is an upper
bound on -log p(x) (except `test_relaxed_nelbo`, which says so):
- `{split}_nelbo`: the mean single-sample negative ELBO over the split.
- `test_bound`: -log (1/m) sum_i p(x, z_i) / q(z_i | x), m = eval.num_samples (Burda et al. 2016).
- `test_relaxed_nelbo`: the negative ELBO with the decoder fed relaxed samples at temperature tau
  (what a relaxed estimator's training loss measures, and what ericjang/gumbel-softmax#5
  reports the paper's figures were reached with). Not a bound on anything.
Evaluation noise comes from its own generator with a fixed seed, so figures are repeatable and
the training random stream is untouched.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from gvae.config import EvalConfig
from gvae.data import Splits
from gvae.model import VAE
from gvae.objective import multi_sample_bound, negative_elbo, relaxed_negative_elbo

EVAL_SEED = 1234


def eval_generator(device: torch.device) -> torch.Generator:
    """A fresh generator with a fixed seed, apart from the training stream."""
    return torch.Generator(device=device).manual_seed(EVAL_SEED)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    """A bar over images, shown only on a terminal (disable=None) and only when asked for."""
    return tqdm(total=total, desc=desc, unit="img", disable=None if progress else True,
                dynamic_ncols=True, leave=False)


def split_nelbo(model: VAE, splits: Splits, split: str, cfg: EvalConfig, progress: bool = False) -> float:
    """Mean single-sample negative ELBO over `split` ("val" or "test")."""
    images = getattr(splits, split)
    with _bar(len(images), f"{split} -ELBO", progress) as bar:
        return negative_elbo(model, images, splits.eval_targets, cfg.batch_size,
                             eval_generator(images.device), bar.update).item()


def test_bound(model: VAE, splits: Splits, cfg: EvalConfig, progress: bool = False) -> float:
    """The m-sample bound on the test set, m = cfg.num_samples."""
    with _bar(len(splits.test), f"test bound m={cfg.num_samples}", progress) as bar:
        return multi_sample_bound(model, splits.test, splits.eval_targets, cfg.num_samples, cfg.max_rows,
                                  eval_generator(splits.test.device), bar.update).item()


def evaluate(
    model: VAE, splits: Splits, cfg: EvalConfig, splits_to_score: tuple[str, ...] = ("val", "test"),
    bound: bool = True, relaxed_tau: float | None = None, progress: bool = False,
) -> dict[str, float]:
    """Named figures: `{split}_nelbo` for each split, `test_bound` if `bound`, and
    `test_relaxed_nelbo` at temperature `relaxed_tau` if given. The model is left in train mode."""
    model.eval()
    try:
        figures = {f"{s}_nelbo": split_nelbo(model, splits, s, cfg, progress) for s in splits_to_score}
        if bound:
            figures["test_bound"] = test_bound(model, splits, cfg, progress)
        if relaxed_tau is not None:
            figures["test_relaxed_nelbo"] = relaxed_negative_elbo(
                model, splits.test, splits.eval_targets, cfg.batch_size, relaxed_tau,
                eval_generator(splits.test.device)).item()
        return figures
    finally:
        model.train()
