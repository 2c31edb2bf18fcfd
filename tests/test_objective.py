"""The reported numbers are bounds: checked against log p(x) computed exactly by enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from gvae.estimators import ESTIMATORS, build_estimator
from gvae.evaluation import multi_sample_bound, multi_sample_bounds, negative_elbo
from gvae.objective import TrainStats, recon_nll
from gvae.tasks.base import Objective
from gvae.tasks.vae import VAE
from tests.conftest import compose_config

N, K = 2, 3  # 9 codes: small enough to enumerate


def _small_vae_and_data() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    cfg = compose_config([f"model.num_vars={N}", f"model.num_classes={K}", "model.hidden=[32]"])
    model = VAE(cfg.model, cfg.data.image_shape)
    x = (torch.rand(6, 784) < 0.3).float()
    return model, x


def _exact(model: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: -log p(x) and the negative ELBO, by summing over all K**N codes."""
    every_code = itertools.product(range(K), repeat=N)
    codes = torch.stack([F.one_hot(torch.tensor(c), K).float() for c in every_code])
    with torch.no_grad():
        pixel_logits = model.decode(codes)  # (codes, 784)
        log_px_z = -torch.stack([recon_nll(pixel_logits, xi.expand_as(pixel_logits)) for xi in x])
        log_joint = log_px_z - N * math.log(K)  # uniform prior
        logits = model.encode(x)
        log_q = torch.stack([model.latent.log_prob(codes, lg.expand(len(codes), N, K)) for lg in logits])
        nelbo = -(log_q.exp() * (log_joint - log_q)).sum(-1)
    return -torch.logsumexp(log_joint, dim=-1), nelbo


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def test_exact_elbo_is_a_bound_and_the_estimate_is_unbiased():
    model, x = _small_vae_and_data()
    exact_nll, exact_nelbo = _exact(model, x)
    assert (exact_nelbo >= exact_nll - 1e-4).all()
    # negative_elbo averages single exact samples; over many images (x repeated) it is unbiased.
    reps = 4000
    g = torch.Generator().manual_seed(1)
    estimate = negative_elbo(model, x.repeat(reps, 1), _identity, batch_size=6000, generator=g)
    assert estimate.item() == pytest.approx(exact_nelbo.mean().item(), abs=0.5)


@pytest.mark.parametrize("max_rows", [100_000, 700])  # one pass per image batch; samples split across passes
def test_multi_sample_bound_approaches_exact_log_likelihood(max_rows):
    model, x = _small_vae_and_data()
    exact_nll, exact_nelbo = _exact(model, x)
    g = torch.Generator().manual_seed(2)
    bound = multi_sample_bound(model, x, _identity, num_samples=5000, max_rows=max_rows, generator=g)
    # With 9 codes and m = 5000 the importance-weighted bound is within a hundredth of a nat of
    # -log p(x), and clearly below the ELBO when the two differ (as they do for this model).
    assert bound.item() == pytest.approx(exact_nll.mean().item(), abs=0.02)
    assert bound.item() < exact_nelbo.mean().item() - 0.1


def test_multi_sample_bound_with_one_sample_is_the_single_sample_bound():
    model, x = _small_vae_and_data()
    _, exact_nelbo = _exact(model, x)
    reps = 4000
    g = torch.Generator().manual_seed(3)
    m1 = multi_sample_bound(model, x.repeat(reps, 1), _identity, num_samples=1, max_rows=6000, generator=g)
    # m = 1: log p(x, z) - log q(z | x) at one sample, whose mean is the ELBO.
    assert m1.item() == pytest.approx(exact_nelbo.mean().item(), abs=0.5)


@pytest.mark.parametrize("max_rows", [100_000, 700])
def test_the_literal_reading_estimates_the_elbo_whatever_m_and_never_lies_below_the_bound(max_rows):
    """The paper's printed m-sample formula with the log inside the mean: -(1/m) sum_i log w_i. Its
    expectation is the negative ELBO for every m, so with m = 5000 it sits on the exact ELBO, far
    above the log-of-the-mean bound from the same samples."""
    model, x = _small_vae_and_data()
    exact_nll, exact_nelbo = _exact(model, x)
    g = torch.Generator().manual_seed(2)
    bound, literal = multi_sample_bounds(model, x, _identity, num_samples=5000, max_rows=max_rows,
                                         generator=g)
    assert literal.item() == pytest.approx(exact_nelbo.mean().item(), abs=0.1)
    assert bound.item() == pytest.approx(exact_nll.mean().item(), abs=0.02)
    assert literal.item() > bound.item() + 0.1
    # m = 1: the two readings are the same number.
    one, same = multi_sample_bounds(model, x, _identity, num_samples=1, max_rows=max_rows,
                                    generator=torch.Generator().manual_seed(3))
    assert one.item() == pytest.approx(same.item(), abs=1e-4)


def test_the_broadcast_likelihood_of_the_bound_equals_the_training_one():
    """recon_nll has two forms (x broadcast over samples for the bound, binary_cross_entropy for
    training); they must agree, or the bound and the -ELBO would measure different models."""
    g = torch.Generator().manual_seed(3)
    logits, x = torch.randn(7, 5, 784, generator=g) * 4, (torch.rand(5, 784, generator=g) < 0.3).float()
    broadcast = recon_nll(logits, x)
    one_by_one = torch.stack([recon_nll(logits[i], x) for i in range(7)])
    torch.testing.assert_close(broadcast, one_by_one, rtol=1e-5, atol=1e-3)


def test_train_stats_name_each_figure_and_accumulate_without_reading():
    stats = TrainStats.of(surrogate=torch.tensor(3.0), nelbo=torch.tensor(5.0), recon=torch.tensor(4.0),
                          kl=torch.tensor(1.0))
    total = (TrainStats.zeros(stats.names, torch.device("cpu"), runs=1)
             .add_(stats.per_run()).add_(stats.per_run()))
    assert total.means(2) == {"surrogate": [3.0], "nelbo": [5.0], "recon": [4.0], "kl": [1.0]}
    assert stats.kl.item() == 1.0 and stats.clone().values is not stats.values
    packed = TrainStats.of(nelbo=torch.tensor([1.0, 2.0]), kl=torch.tensor([0.5, 0.25]))  # two runs
    assert packed.per_run() is packed and packed.means(1) == {"nelbo": [1.0, 2.0], "kl": [0.5, 0.25]}


def _exact_k_sample_bound(model: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """Per image: E[-log (1/K) sum_k p(x, z_k) / q(z_k | x)] over z_1..z_K ~ q iid, every K-tuple of codes."""
    every_code = itertools.product(range(K), repeat=N)
    codes = torch.stack([F.one_hot(torch.tensor(c), K).float() for c in every_code])
    with torch.no_grad():
        pixel_logits = model.decode(codes)
        log_px_z = -torch.stack([recon_nll(pixel_logits, xi.expand_as(pixel_logits)) for xi in x])
        logits = model.encode(x)
        log_q = torch.stack([model.latent.log_prob(codes, lg.expand(len(codes), N, K)) for lg in logits])
        log_w = log_px_z - N * math.log(K) - log_q  # (images, codes)
        tuples = torch.tensor(list(itertools.product(range(len(codes)), repeat=k)))
        weight = log_q[:, tuples].sum(-1).exp()
        bound = math.log(k) - torch.logsumexp(log_w[:, tuples], -1)
    return (weight * bound).sum(-1)


def test_the_iwae_training_objective_is_the_k_sample_bound():
    """task.objective=iwae with an estimator whose codes are exact (straight-through): the training
    figure `bound`, averaged over many draws, is E[-log (1/K) sum_k w_k] computed by enumeration, which
    lies between -log p(x) and the negative ELBO: the same scale as the test bound."""
    model, x = _small_vae_and_data()
    model.objective, model.samples = Objective.iwae, 2
    estimator = build_estimator(ESTIMATORS["straight_through"].config(), model.latent)
    reps = 3000
    _, stats = model.training_loss(estimator, x.repeat(reps, 1), torch.tensor(1.0))
    exact_nll, exact_nelbo = _exact(model, x)
    expected = _exact_k_sample_bound(model, x, 2)
    assert (exact_nll < expected).all() and (expected < exact_nelbo).all()
    assert stats.bound.item() == pytest.approx(expected.mean().item(), abs=0.1)
    assert abs(stats.bound.item() - exact_nelbo.mean().item()) > 0.3  # the check tells the two apart
