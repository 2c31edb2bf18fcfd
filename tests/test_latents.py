"""The latent variables: Gumbel-Max and logistic sampling, the relaxation, safe noise, ST and the KL."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import OneHotCategorical, kl_divergence

from gvae.latents import Bernoulli, Categorical, _uniform

DRAWS = 100_000
# Significance level of the goodness-of-fit tests. The seed is fixed, so each test is
# deterministic; the level bounds the chance that a correct sampler would have failed with the
# chosen seed (1 in 1000). With 1e5 draws the test is far more sensitive than that level needs:
# logits tempered by only 5% already give p ~ 1e-26 (by 20%: p underflows to 0, checked below).
ALPHA = 1e-3


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi2 >= observed) for observed counts against expected probabilities (df = cells - 1)."""
    counts, probs = counts.double(), probs.double()
    expected = counts.sum() * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    # The chi-square survival function is the regularized upper incomplete gamma Q(df/2, x/2).
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2).item()


def categorical_counts(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """Class counts of DRAWS Gumbel-Max samples of one K-class variable with these logits."""
    latent = Categorical(num_vars=1, num_classes=len(logits))
    g = torch.Generator().manual_seed(seed)
    z = latent.sample(logits.expand(DRAWS, 1, len(logits)), generator=g)
    return z.sum(dim=(0, 1))


PI_LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.3, 1.5, -3.0])


# -----------------------------------------------------------------------------
# exact samples follow q


def test_gumbel_argmax_follows_softmax_of_the_logits():
    counts = categorical_counts(PI_LOGITS, seed=0)
    assert counts.sum() == DRAWS  # one class per draw
    p = chi_square_p_value(counts, torch.softmax(PI_LOGITS, dim=-1))
    assert p > ALPHA, f"chi-square p-value {p:.2e}: counts {counts.tolist()}"


def test_chi_square_rejects_a_wrong_sampler():
    # The same test on samples from softmax(logits / 1.2), a plausible temperature bug, must fail:
    # it shows the test has the power to catch a sampler that is slightly off.
    counts = categorical_counts(PI_LOGITS / 1.2, seed=0)
    assert chi_square_p_value(counts, torch.softmax(PI_LOGITS, dim=-1)) < 1e-10


def test_logistic_sign_follows_sigmoid_of_the_logit():
    logits = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.7, 2.5])
    latent = Bernoulli(num_vars=len(logits))
    g = torch.Generator().manual_seed(0)
    z = latent.sample(logits.expand(DRAWS, len(logits)), generator=g)
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    ones = z.sum(0)
    p1 = torch.sigmoid(logits)
    for unit in range(len(logits)):  # one two-cell chi-square test per unit, Bonferroni-corrected
        counts = torch.stack([DRAWS - ones[unit], ones[unit]])
        p = chi_square_p_value(counts, torch.stack([1 - p1[unit], p1[unit]]))
        assert p > ALPHA / len(logits), f"unit {unit}: P(z=1) {ones[unit] / DRAWS:.4f} vs {p1[unit]:.4f}"


@pytest.mark.parametrize(
    "latent, mean, var",
    [
        (Categorical(1, 1_000_000), 0.5772156649, math.pi**2 / 6),  # Gumbel: Euler's gamma, pi^2/6
        (Bernoulli(1_000_000), 0.0, math.pi**2 / 3),  # logistic
    ],
    ids=["gumbel", "logistic"],
)
def test_noise_has_the_exact_mean_and_variance(latent, mean, var):
    # A clamp or an eps in the logs that biased the noise would show here: 1e6 draws measure the
    # mean to a standard error of about 0.0013 (Gumbel) and 0.0018 (logistic); allowed: 5 of them.
    g = torch.Generator().manual_seed(0)
    noise = latent.noise(torch.zeros(1, *latent.shape), generator=g).double().flatten()
    n = noise.numel()
    assert abs(noise.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(noise.var().item() / var - 1) < 0.01


# -----------------------------------------------------------------------------
# the relaxation


def test_relaxed_samples_lie_on_the_simplex_and_approach_one_hot_as_tau_falls():
    latent = Categorical(num_vars=20, num_classes=10)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 20, 10, generator=g)
    perturbed = logits + latent.noise(logits, generator=g)
    hard = latent.harden(perturbed)
    mean_max = []
    for tau in [10.0, 1.0, 0.1, 0.01]:
        y = latent.relax(perturbed, tau)
        assert (y >= 0).all()
        torch.testing.assert_close(y.sum(-1), torch.ones(500, 20))
        assert torch.equal(latent.harden(y), hard)  # the relaxation keeps the Gumbel-Max class
        mean_max.append(y.max(-1).values.mean().item())
    assert mean_max[0] < 0.2  # tau = 10: close to uniform (0.1)
    assert all(a < b for a, b in zip(mean_max, mean_max[1:], strict=False)), mean_max
    assert mean_max[-1] > 0.99, mean_max


def test_relaxed_binary_samples_lie_in_the_unit_interval_and_approach_zero_or_one_as_tau_falls():
    latent = Bernoulli(num_vars=200)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 200, generator=g)
    perturbed = logits + latent.noise(logits, generator=g)
    distance = []  # mean distance to the nearer of 0 and 1
    for tau in [10.0, 1.0, 0.1, 0.01]:
        y = latent.relax(perturbed, tau)
        assert ((y >= 0) & (y <= 1)).all()
        assert torch.equal(latent.harden(perturbed), (y > 0.5).float())
        distance.append(torch.minimum(y, 1 - y).mean().item())
    assert all(a > b for a, b in zip(distance, distance[1:], strict=False)), distance
    assert distance[-1] < 0.01, distance


# -----------------------------------------------------------------------------
# safe noise


def _rand_returning(value: float):
    """A torch.rand replacement whose every draw is `value`, in the requested dtype."""

    def rand(*size, dtype=None, device=None, generator=None, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return torch.full(tuple(shape), value, dtype=dtype or torch.float32, device=device)

    return rand


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-24], ids=["zero", "largest_below_one"])
@pytest.mark.parametrize("latent", [Categorical(3, 4), Bernoulli(5)], ids=["categorical", "bernoulli"])
def test_noise_is_finite_at_the_ends_of_the_uniform_range(monkeypatch, latent, u):
    # torch.rand in float32 returns multiples of 2**-24 in [0, 1): 0 and 1 - 2**-24 are its ends.
    monkeypatch.setattr(torch, "rand", _rand_returning(u))
    assert (_uniform(torch.Size([2, 3]), torch.device("cpu"), None) > 0).all()
    logits = torch.zeros(2, *latent.shape)
    noise = latent.noise(logits)
    assert torch.isfinite(noise).all(), noise
    y = latent.relax(logits + noise, 0.1)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("latent", [Categorical(20, 10), Bernoulli(200)], ids=["categorical", "bernoulli"])
def test_noise_under_bfloat16_autocast_is_finite_float32(latent):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(784, latent.num_logits)
    x = torch.rand(1000, 784)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flat = encoder(x)
        assert flat.dtype == torch.bfloat16  # autocast is active
        for logits in (latent.logits(flat), flat.view(-1, *latent.shape)):  # float32 and bf16 logits
            noise = latent.noise(logits)
            assert noise.dtype == torch.float32
            assert torch.isfinite(noise).all()
            z = latent.sample(logits)
            assert torch.isfinite(z).all()


# -----------------------------------------------------------------------------
# analytic KL


@pytest.mark.parametrize("prior", ["uniform", "non_uniform"])
def test_categorical_kl_matches_torch_distributions(prior):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 20, 10, generator=g) * 2
    prior_logits = torch.zeros(20, 10) if prior == "uniform" else torch.randn(20, 10, generator=g)
    kl = Categorical(20, 10).kl(logits, prior_logits)
    expected = kl_divergence(OneHotCategorical(logits=logits), OneHotCategorical(logits=prior_logits))
    assert kl.shape == (32,)
    torch.testing.assert_close(kl, expected.sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prior", ["uniform", "non_uniform"])
def test_bernoulli_kl_matches_torch_distributions(prior):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 200, generator=g) * 2
    prior_logits = torch.zeros(200) if prior == "uniform" else torch.randn(200, generator=g)
    kl = Bernoulli(200).kl(logits, prior_logits)
    # torch's Bernoulli KL does not broadcast the prior itself.
    prior = TorchBernoulli(logits=prior_logits.expand(32, 200))
    expected = kl_divergence(TorchBernoulli(logits=logits), prior)
    assert kl.shape == (32,)
    torch.testing.assert_close(kl, expected.sum(-1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("latent", [Categorical(1, 3), Bernoulli(1)], ids=["categorical", "bernoulli"])
def test_noise_given_the_sample_has_the_conditional_distribution_of_the_noise(latent):
    """conditional_perturbed(logits, z) ~ logits + noise given that the exact sample is z: the
    same sample, and for each value of z the same mean and quantiles as the filtered unconditional
    draws (Gumbel-Rao and REBAR rest on it)."""
    torch.manual_seed(0)
    logits = torch.tensor([[0.5, -0.3, 1.2]]) if isinstance(latent, Categorical) else torch.tensor([0.4])
    n = 200_000
    batch = logits.expand(n, *latent.shape)
    perturbed = batch + latent.noise(batch)
    z = latent.harden(perturbed)
    conditional = latent.conditional_perturbed(logits, z)
    assert torch.equal(latent.harden(conditional), z)
    for value in range(3 if isinstance(latent, Categorical) else 2):
        mask = z[:, 0, value] > 0 if isinstance(latent, Categorical) else z[:, 0] == value
        a, b = perturbed[mask].flatten(1), conditional[mask].flatten(1)
        se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
        assert ((a.mean(0) - b.mean(0)).abs() < 5 * se).all()
        for q in (0.1, 0.5, 0.9):
            assert torch.allclose(a.quantile(q, dim=0), b.quantile(q, dim=0), atol=0.03)
    # A wrong conditional (the unconditional noise) fails the same comparison.
    other = batch + latent.noise(batch)
    mask = z[:, 0, 0] > 0 if isinstance(latent, Categorical) else z[:, 0] == 1
    assert not torch.allclose(perturbed[mask].mean(0), other[mask].mean(0), atol=0.05)
