"""Each estimator's defining property, on problems small enough to enumerate exactly.

The problem: q with fixed logits over 2 categorical variables with 3 classes (9 codes) or 3
binary variables (8 codes), and f(z; W) a small fixed MLP of the code whose weights W stand
for the decoder. The exact gradient of E_q[f] with respect to the logits and W is a sum over
all codes. Expectations of an estimator are averages over a large batch of draws, each with
its own copy of the logits and W so that per-draw gradients give the standard error.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F

from gvae import api
from gvae.config import validate
from gvae.engine import build_engine
from gvae.errors import ConfigError
from gvae.estimators import ESTIMATORS, Estimator, EstimatorConfig, ScoreFunctionBase, build_estimator
from gvae.jobs import train
from gvae.latents import Bernoulli, Categorical, Latent
from gvae.objective import repeat_rows
from gvae.tasks.vae import VAE
from tests.conftest import TINY, compose_config, estimator_overrides
from tests.graph_standin import NoHostReads

LATENTS: dict[str, Callable[[], Latent]] = {
    "categorical": lambda: Categorical(num_vars=2, num_classes=3),
    "bernoulli": lambda: Bernoulli(num_vars=3),
}
HARD_FORWARD = [
    "st_gumbel_softmax", "straight_through", "slope_annealed_st", "score_function", "darn", "muprop",
    "reinmax_rao",
]
DRAWS = 100_000  # per expectation check
Z_MAX = 5.0  # allowed |estimate - exact| in standard errors: ~40 coordinates, P(false alarm) < 1e-4
HIDDEN = 4
# VAE latents for the objective and trainer checks: small categorical, and the paper's 200 binary units.
MODELS = {"categorical": ["model.num_vars=4", "model.num_classes=3"], "bernoulli": ["model=bernoulli"]}
# Every registered estimator with every latent type it is defined for.
COMBINATIONS = [(name, latent) for name in sorted(ESTIMATORS) for latent in MODELS
                if latent in ESTIMATORS[name].config.latents]


def make(name: str, latent: Latent, **options) -> Estimator:
    """The estimator `name` with its default options, or these, through the public API (gvae.api):
    what these tests check is what a user's own model gets."""
    return api.estimator(name, latent, **options)


class Problem:
    """E_q[f(z; W)] with f(z; W) = v . act(z W): act = softplus, or the identity for a linear f."""

    def __init__(self, latent: Latent, linear: bool = False, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.latent, self.linear = latent, linear
        self.logits = torch.randn(latent.shape, generator=g)
        self.w = torch.randn(latent.code_size, HIDDEN, generator=g)
        self.v = torch.randn(HIDDEN, generator=g)

    def f(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """f per example; w holds one weight matrix per example: (B, code_size, HIDDEN)."""
        h = torch.einsum("bd,bdh->bh", self.latent.flatten(z), w)
        return ((h if self.linear else F.softplus(h)) * self.v).sum(-1)

    def codes(self) -> torch.Tensor:
        """Every code, built through the latent's own interface."""
        zero = torch.zeros(1, *self.latent.shape)
        values = itertools.product(range(self.latent.num_values), repeat=self.latent.num_vars)
        codes = []
        for value in values:
            code = zero
            for var, k in enumerate(value):
                code = self.latent.one_value(code, var, k)
            codes.append(code)
        return torch.cat(codes)

    def exact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """d E_q[f] / d logits and d E_q[f] / d W, by enumeration."""
        logits = self.logits.clone().requires_grad_()
        w = self.w.clone().requires_grad_()
        codes = self.codes()
        n = len(codes)
        q = self.latent.log_prob(codes, logits.expand(n, *self.latent.shape)).exp()
        assert torch.allclose(q.sum(), torch.tensor(1.0))
        expectation = (q * self.f(codes, w.expand(n, *w.shape))).sum()
        return torch.autograd.grad(expectation, [logits, w])

    def estimate(
        self, estimator: Estimator, draws: int, tau: float = 1.0, sample_call: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-draw gradients (logits, W) from one call on `draws` draws, and the codes of the
        estimator's sample: those f saw in its call number `sample_call` (the first, unless the
        estimator probes f elsewhere before it evaluates the sample)."""
        logits = self.logits.expand(draws, *self.latent.shape).clone().requires_grad_()
        w = self.w.expand(draws, *self.w.shape).clone().requires_grad_()
        seen: list[torch.Tensor] = []

        def f(z: torch.Tensor) -> torch.Tensor:
            seen.append(z.detach())
            return self.f(z, w)

        surrogate, value = estimator(logits, torch.tensor(tau), f)
        self.decoder_calls = sum(len(z) for z in seen) / draws  # decoder passes of the batch
        assert value.shape == (draws,) and not value.requires_grad
        sample = seen[sample_call]
        torch.testing.assert_close(value, self.f(sample, w).detach())  # value is f at the sample
        g_logits, g_w = torch.autograd.grad(surrogate.mean(), [logits, w])
        return g_logits * draws, g_w * draws, sample


    def log_weight(self, z: torch.Tensor, w: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(z) - f(z; W) - log q(z) per example: -f stands for log p(x | z), the prior is uniform."""
        prior = torch.zeros(self.latent.shape)
        return self.latent.log_prob(z, prior) - self.f(z, w) - self.latent.log_prob(z, logits)

    def exact_bound(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """d/d(logits, W) of the K-sample bound's negative, -E[log (1/K) sum_k w(z_k)], z_k ~ q iid:
        a sum over every K-tuple of codes."""
        logits = self.logits.clone().requires_grad_()
        w = self.w.clone().requires_grad_()
        codes = self.codes()
        n = len(codes)
        log_q = self.latent.log_prob(codes, logits.expand(n, *self.latent.shape))
        log_w = self.log_weight(codes, w.expand(n, *w.shape), logits.expand(n, *self.latent.shape))
        tuples = torch.tensor(list(itertools.product(range(n), repeat=k)))  # (n^K, K)
        weight = log_q[tuples].sum(-1).exp()
        bound = math.log(k) - torch.logsumexp(log_w[tuples], dim=-1)
        return torch.autograd.grad((weight * bound).sum(), [logits, w])

    def estimate_bound(self, estimator: Estimator, draws: int, k: int,
                       tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-draw gradients (logits, W) of the K-sample objective through multi_sample, each draw
        its own example with K samples, and the bound's value at the samples."""
        logits = self.logits.expand(draws, *self.latent.shape).clone().requires_grad_()
        w = self.w.expand(draws, *self.w.shape).clone().requires_grad_()
        rows, w_rows = repeat_rows(logits, k, 0), repeat_rows(w, k, 0)
        self.seen = []

        def neg_log_weight(z: torch.Tensor) -> torch.Tensor:
            self.seen.append(z.detach())
            return -self.log_weight(z, w_rows, rows)

        surrogate, bound = estimator.multi_sample(rows, torch.tensor(tau), neg_log_weight, k)
        self.decoder_calls = sum(len(z) for z in self.seen) / draws
        assert bound.shape == (draws,) and not bound.requires_grad
        g_logits, g_w = torch.autograd.grad(surrogate.mean(), [logits, w])
        return g_logits * draws, g_w * draws, bound


def assert_unbiased(per_draw: torch.Tensor, exact: torch.Tensor) -> None:
    """The mean of per-draw estimates is within Z_MAX standard errors of the exact value."""
    mean = per_draw.mean(0)
    se = per_draw.std(0) / math.sqrt(len(per_draw))
    z = (mean - exact).abs() / (se + 1e-12)
    assert (z < Z_MAX).all(), f"max |z| = {z.max():.1f}: mean {mean.flatten()}, exact {exact.flatten()}"


def fixed_normalization(estimator: ScoreFunctionBase, baseline: float, var: float) -> float:
    """Put the moving averages at a converged state; return the scale 1 / sqrt(max(var, min_var))."""
    estimator.mean.fill_(baseline)
    estimator.var.fill_(var)
    estimator.started.fill_(True)
    return 1.0 / math.sqrt(max(var, estimator.min_var))


def grad_through(soft: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor,
                 problem: Problem, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-draw gradients of f at the fixed code z, passed to the logits through soft(logits)."""
    z = z.clone().requires_grad_()
    w = problem.w.expand(len(z), *problem.w.shape).clone().requires_grad_()
    df_dz, g_w = torch.autograd.grad(problem.f(z, w).sum(), [z, w])
    logits = logits.clone().requires_grad_()
    (g_logits,) = torch.autograd.grad(soft(logits), logits, grad_outputs=df_dz)
    return g_logits, g_w


# -----------------------------------------------------------------------------
# unbiased estimators: score function and MuProp


@pytest.mark.parametrize("latent", LATENTS)
@pytest.mark.parametrize("name", ["score_function", "muprop"])
def test_unbiased_up_to_the_normalization_scale(name, latent):
    # With the baseline b and variance v held fixed (a converged moving average), the encoder
    # gradient is the exact gradient times s = 1/sqrt(max(v, min_var)); normalization only
    # rescales the step. The decoder gradient is not rescaled.
    torch.manual_seed(1)
    problem = Problem(LATENTS[latent]())
    exact_logits, exact_w = problem.exact()
    estimator = make(name, problem.latent)
    scale = fixed_normalization(estimator, baseline=1.0, var=4.0)
    g_logits, g_w, _ = problem.estimate(estimator, DRAWS)
    assert_unbiased(g_logits / scale, exact_logits)
    assert_unbiased(g_w, exact_w)


def test_the_unbiasedness_check_detects_a_biased_estimator():
    # Straight-through on the same problem: its bias is far outside the statistical tolerance.
    torch.manual_seed(1)
    problem = Problem(LATENTS["categorical"]())
    exact_logits, _ = problem.exact()
    g_logits, _, _ = problem.estimate(make("straight_through", problem.latent), DRAWS)
    with pytest.raises(AssertionError):
        assert_unbiased(g_logits, exact_logits)


DARN_SAMPLE_CALL = {"sample": 0, "center": 1}  # DARN's derivative pass comes first, at the code it expands at


@pytest.mark.parametrize("expand_at", ["sample", "center"])
@pytest.mark.parametrize("latent", LATENTS)
def test_darn_is_exact_in_expectation_for_a_linear_f(latent, expand_at):
    # DARN's Taylor expansion is exact when f is linear in z, wherever its derivative is taken, so
    # there it is unbiased (with its per-variable normalization scale, here the same for every
    # variable, accounted for).
    torch.manual_seed(2)
    problem = Problem(LATENTS[latent](), linear=True)
    exact_logits, exact_w = problem.exact()
    estimator = make("darn", problem.latent, expand_at=expand_at)
    scale = fixed_normalization(estimator, baseline=0.5, var=9.0)
    g_logits, g_w, _ = problem.estimate(estimator, DRAWS, sample_call=DARN_SAMPLE_CALL[expand_at])
    assert_unbiased(g_logits / scale, exact_logits)
    assert_unbiased(g_w, exact_w)


@pytest.mark.parametrize("expand_at", ["sample", "center"])
@pytest.mark.parametrize("center", [None, 0.5])
@pytest.mark.parametrize("latent", LATENTS)
def test_darn_backward_is_the_per_variable_taylor_learning_signal(latent, center, expand_at):
    torch.manual_seed(3)
    problem = Problem(LATENTS[latent]())
    estimator = make("darn", problem.latent, center=center, expand_at=expand_at)
    baseline, var = 0.3, 2.0
    scale = fixed_normalization(estimator, baseline, var)
    g_logits, g_w, z = problem.estimate(estimator, 64, sample_call=DARN_SAMPLE_CALL[expand_at])
    # By hand: L_j = df/dz_j (z_j - c_j), c = 1/K or 1/2 by default, else the option in every
    # coordinate, the derivative taken at z or at the code c; encoder gradient (L_j - b) s grad log q(z_j).
    lat = problem.latent
    logits = problem.logits.expand_as(z).clone().requires_grad_()
    c = lat.center(logits.detach()) if center is None else torch.full_like(z, center)
    z_ = (z if expand_at == "sample" else c).clone().requires_grad_()
    w = problem.w.expand(len(z), *problem.w.shape).clone().requires_grad_()
    df_dz, _ = torch.autograd.grad(problem.f(z_, w).sum(), [z_, w])
    z_ = z.clone().requires_grad_()  # the decoder's gradient: at the sample, whatever the expansion
    _, expected_w = torch.autograd.grad(problem.f(z_, w).sum(), [z_, w])
    signal = (lat.per_var(df_dz * (z - c)) - baseline) * scale
    (expected_logits,) = torch.autograd.grad((signal * lat.log_prob_vars(z, logits)).sum(), logits)
    torch.testing.assert_close(g_logits, expected_logits)
    torch.testing.assert_close(g_w, expected_w)


# -----------------------------------------------------------------------------
# biased estimators: exact samples forward, their paper's backward


@pytest.mark.parametrize("latent", LATENTS)
@pytest.mark.parametrize("name", HARD_FORWARD)
def test_forward_is_an_exact_sample_from_q(name, latent):
    torch.manual_seed(4)
    problem = Problem(LATENTS[latent]())
    _, _, z = problem.estimate(make(name, problem.latent), 20_000, tau=0.5)
    assert ((z == 0) | (z == 1)).all()
    if isinstance(problem.latent, Categorical):
        assert (z.sum(-1) == 1).all()
    # The sample follows q: the frequency of each value is its probability.
    assert_unbiased(z, problem.latent.probs(problem.logits))


@pytest.mark.parametrize("latent", LATENTS)
@pytest.mark.parametrize(("name", "tau"), [("straight_through", 0.5), ("slope_annealed_st", 0.5),
                                           ("slope_annealed_st", 1.0)])
def test_straight_through_backward_is_the_gradient_through_the_slope(name, tau, latent):
    # ST: the gradient of f at the exact sample, passed back through p = softmax/sigmoid(logits);
    # slope-annealed ST: through softmax/sigmoid(logits / tau), so at tau = 1 the two agree.
    torch.manual_seed(5)
    problem = Problem(LATENTS[latent]())
    g_logits, g_w, z = problem.estimate(make(name, problem.latent), 64, tau=tau)
    slope = 1.0 / tau if name == "slope_annealed_st" else 1.0
    expected_logits, expected_w = grad_through(
        lambda lg: problem.latent.probs(lg * slope), problem.logits.expand_as(z), problem, z)
    torch.testing.assert_close(g_logits, expected_logits)
    torch.testing.assert_close(g_w, expected_w)
    if slope != 1.0:  # the slope makes a difference
        plain, _ = grad_through(problem.latent.probs, problem.logits.expand_as(z), problem, z)
        assert not torch.allclose(g_logits, plain)


@pytest.mark.parametrize("latent", LATENTS)
def test_st_gumbel_softmax_forward_is_the_hard_sample_and_backward_the_relaxed_gradient(latent):
    problem = Problem(LATENTS[latent]())
    logits = problem.logits.expand(64, *problem.latent.shape)
    torch.manual_seed(6)
    noise = problem.latent.noise(logits)
    torch.manual_seed(6)  # the estimator draws the same noise
    g_logits, g_w, z = problem.estimate(make("st_gumbel_softmax", problem.latent), 64, tau=0.5)
    assert torch.equal(z, problem.latent.harden(logits + noise))
    expected_logits, expected_w = grad_through(
        lambda lg: problem.latent.relax(lg + noise, 0.5), logits, problem, z)
    torch.testing.assert_close(g_logits, expected_logits)
    torch.testing.assert_close(g_w, expected_w)


# -----------------------------------------------------------------------------
# straight-through Gumbel-Softmax


@pytest.mark.parametrize("latent", [Categorical(20, 10), Bernoulli(200)], ids=["categorical", "bernoulli"])
def test_st_forward_is_one_hot(latent):
    logits = torch.randn(64, *latent.shape, generator=torch.Generator().manual_seed(1)) * 3
    torch.manual_seed(0)
    z = make("st_gumbel_softmax", latent).sample(logits, torch.tensor(0.7))
    torch.manual_seed(0)  # the same noise again
    perturbed = logits + latent.noise(logits)
    assert torch.equal(z, latent.harden(perturbed))  # exactly the Gumbel-Max sample, no rounding
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    if isinstance(latent, Categorical):
        assert torch.equal(z.sum(-1), torch.ones(64, 20))


@pytest.mark.parametrize("latent", [Categorical(20, 10), Bernoulli(200)], ids=["categorical", "bernoulli"])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_st_gradient_equals_the_relaxed_sample_gradient_for_the_same_noise(latent, tau):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, *latent.shape, generator=g)
    weights = torch.randn(64, *latent.shape, generator=g)  # f(z) = sum(weights * z), fixed and linear

    def grad_of(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits = base.clone().requires_grad_()
        torch.manual_seed(2)  # the same noise for both estimators
        z = make(name, latent).sample(logits, torch.tensor(tau))
        (grad,) = torch.autograd.grad((weights * z).sum(), logits)
        return z.detach(), grad

    z_st, grad_st = grad_of("st_gumbel_softmax")
    z_relaxed, grad_relaxed = grad_of("gumbel_softmax")
    assert not torch.equal(z_st, z_relaxed)  # different forward values ...
    assert grad_relaxed.abs().sum() > 0
    torch.testing.assert_close(grad_st, grad_relaxed, rtol=1e-6, atol=1e-7)  # ... the same gradient


# -----------------------------------------------------------------------------
# the estimators since the paper


def supported(name: str) -> list[str]:
    return [latent for latent in LATENTS if latent in ESTIMATORS[name].config.latents]


@pytest.mark.parametrize(("name", "latent"), [("rebar", lt) for lt in supported("rebar")]
                         + [("disarm", lt) for lt in supported("disarm")])
def test_rebar_and_disarm_are_unbiased(name, latent):
    torch.manual_seed(3)
    problem = Problem(LATENTS[latent]())
    exact_logits, exact_w = problem.exact()
    g_logits, g_w, _ = problem.estimate(make(name, problem.latent), DRAWS)
    assert_unbiased(g_logits, exact_logits)
    assert_unbiased(g_w, exact_w)


LEARNED = [("rebar", {"learn": True, "eta": 0.6, "temperature": 0.3}), ("relax", {})]


def perturb_control_variate(estimator: Estimator, seed: int) -> None:
    """Move a learned control variate's parameters off their starting values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in estimator.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(("name", "options"), LEARNED, ids=[n for n, _ in LEARNED])
@pytest.mark.parametrize("latent", LATENTS)
def test_learned_control_variates_are_unbiased(name, options, latent):
    """Unbiased whatever the control variate's parameters: at moved values of eta, lambda and r_rho."""
    torch.manual_seed(11)
    problem = Problem(LATENTS[latent]())
    exact_logits, exact_w = problem.exact()
    estimator = make(name, problem.latent, **options)
    perturb_control_variate(estimator, 11)
    g_logits, g_w, _ = problem.estimate(estimator, DRAWS)
    assert_unbiased(g_logits, exact_logits)
    assert_unbiased(g_w, exact_w)


def logit_gradient_variance(problem: Problem, estimator: Estimator, draws: int, seed: int) -> torch.Tensor:
    """The variance objective by its definition, recomputed from scratch: the mean square of the
    gradient of the batch's mean loss in each logit, for the draws of `seed`."""
    torch.manual_seed(seed)
    logits = problem.logits.expand(draws, *problem.latent.shape).clone().requires_grad_()
    w = problem.w.expand(draws, *problem.w.shape)
    surrogate, _ = estimator(logits, torch.tensor(1.0), lambda z: problem.f(z, w))
    (grad,) = torch.autograd.grad(surrogate.mean(), logits)
    return grad.square().mean()


@pytest.mark.parametrize(("name", "options"), LEARNED, ids=[n for n, _ in LEARNED])
@pytest.mark.parametrize("latent", LATENTS)
def test_the_control_variate_gets_the_gradient_of_the_estimators_variance(name, options, latent):
    """What the control variate's parameters receive from the loss's backward pass is the derivative
    of the variance objective, checked by central differences in eta and in log lambda (the same draws)."""
    problem = Problem(LATENTS[latent]())
    estimator = make(name, problem.latent, **options)
    perturb_control_variate(estimator, 12)
    torch.manual_seed(13)
    logits = problem.logits.expand(64, *problem.latent.shape).clone().requires_grad_()
    w = problem.w.expand(64, *problem.w.shape)
    surrogate, _ = estimator(logits, torch.tensor(1.0), lambda z: problem.f(z, w))
    surrogate.mean().backward()
    scale = logit_gradient_variance(problem, estimator, 64, 13)  # the objective's own size
    for param in (estimator.eta, estimator.log_temperature):
        eps, base = 1e-3, param.detach().clone()
        with torch.no_grad():
            param.copy_(base + eps)
        up = logit_gradient_variance(problem, estimator, 64, 13)
        with torch.no_grad():
            param.copy_(base - eps)
        down = logit_gradient_variance(problem, estimator, 64, 13)
        with torch.no_grad():
            param.copy_(base)
        numeric = (up - down) / (2 * eps)
        torch.testing.assert_close(param.grad, numeric, rtol=2e-2, atol=1e-4 * scale.item())
    assert estimator.eta.grad.abs() > 1e-2 * scale  # a derivative worth checking


@pytest.mark.parametrize(("name", "options"), [("rebar", {"learn": True, "eta": 0.0}),
                                               ("relax", {"eta": 0.0})], ids=["rebar", "relax"])
def test_learning_the_control_variate_lowers_the_gradients_variance(name, options):
    """From eta = 0 (no control variate: REINFORCE), 300 Adam steps on the variance objective alone
    lower the per-draw variance of the logit gradient, measured on fresh draws, by at least a third."""
    torch.manual_seed(14)
    problem = Problem(LATENTS["categorical"]())
    estimator = make(name, problem.latent, **options)

    def per_draw_variance() -> torch.Tensor:
        g_logits, _, _ = problem.estimate(estimator, 20_000)
        return g_logits.var(0).sum()

    before = per_draw_variance()
    optimizer = torch.optim.Adam(estimator.parameters(), lr=1e-2)
    w = problem.w.expand(256, *problem.w.shape)
    for _ in range(300):
        logits = problem.logits.expand(256, *problem.latent.shape).clone().requires_grad_()
        surrogate, _ = estimator(logits, torch.tensor(1.0), lambda z: problem.f(z, w))
        optimizer.zero_grad()
        surrogate.mean().backward()
        optimizer.step()
    after = per_draw_variance()
    assert after < 0.67 * before, (before, after)
    assert estimator.eta.item() > 0.1


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("latent", supported("rloo"))
def test_rloo_is_unbiased(latent, k):
    torch.manual_seed(5)
    problem = Problem(LATENTS[latent]())
    exact_logits, exact_w = problem.exact()
    g_logits, g_w, _ = problem.estimate(make("rloo", problem.latent, k=k), DRAWS)
    assert_unbiased(g_logits, exact_logits)
    assert_unbiased(g_w, exact_w)


def test_rloo_backward_centres_each_sample_by_the_others_mean():
    """For one batch of draws, the gradient reaching the logits is the stated formula: sample k's
    signal is f(z_k) minus the mean of the other K - 1 values (a baseline with z_k in it biases)."""
    latent = LATENTS["categorical"]()
    logits = torch.randn(64, *latent.shape, requires_grad=True)
    codes: list[torch.Tensor] = []

    def f(z):
        codes.append(z)
        return latent.flatten(z)[:, 0] * 3.0

    surrogate, _ = make("rloo", latent, k=3)(logits, torch.tensor(1.0), f)
    (grad,) = torch.autograd.grad(surrogate.sum(), logits)
    values = torch.stack([latent.flatten(z)[:, 0] * 3.0 for z in codes])  # (K, B)
    expected = torch.zeros_like(logits)
    for k, z in enumerate(codes):
        others = (values.sum(0) - values[k]) / 2
        log_q = latent.log_prob(z, logits)
        (g,) = torch.autograd.grad(((values[k] - others) * log_q).sum() / 3, logits, retain_graph=True)
        expected += g
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("latent", supported("rloo"))
def test_rloo_gives_exactly_zero_where_every_sample_agrees(latent):
    """A variable that all K samples of an example put at the same value gets no gradient at all,
    not rounding (Adam turns a gradient of rounding alone into steps of the learning rate's size)."""
    latent = LATENTS[latent]()
    logits = torch.randn(4096, *latent.shape, requires_grad=True)
    w = torch.randn(latent.code_size, HIDDEN)
    codes: list[torch.Tensor] = []

    def f(z):
        codes.append(z)
        return F.softplus(latent.flatten(z) @ w).sum(-1) * 1.7

    surrogate, _ = make("rloo", latent, k=3)(logits, torch.tensor(1.0), f)
    (grad,) = torch.autograd.grad(surrogate.sum(), logits)
    agree = torch.stack([z == codes[0] for z in codes]).all(0)
    if logits.dim() == 3:  # a categorical variable agrees when its whole one-hot vector does
        agree = agree.all(-1, keepdim=True).expand_as(agree)
    assert agree.float().mean() > 0.1 and (~agree).any()
    assert (grad[agree] == 0).all() and (grad[~agree] != 0).any()


@pytest.mark.parametrize(("name", "latent", "options"),
                         [(name, lt, {}) for name in sorted(ESTIMATORS) for lt in supported(name)]
                         + [("rloo", "bernoulli", {"k": 3})])
def test_the_stated_cost_is_the_number_of_decoder_evaluations(name, latent, options):
    """`gvae-train --help` states each estimator's decoder evaluations per step: the fair-cost measure."""
    problem = Problem(LATENTS[latent]())
    estimator = make(name, problem.latent, **options)
    cost = estimator.cfg.decoder_evaluations
    if cost == "task.samples":  # K passes of the objective's samples
        problem.estimate_bound(estimator, 16, k=3)
        assert problem.decoder_calls == 3
    else:
        problem.estimate(estimator, 16)
        assert problem.decoder_calls == (int(cost) if cost.isdigit() else getattr(estimator.cfg, cost))


@pytest.mark.parametrize("latent", supported("gumbel_rao"))
def test_gumbel_rao_has_the_mean_of_st_gumbel_softmax_and_no_more_variance(latent):
    """Rao-Blackwellisation: E[GR] = E[ST-GS] (a two-sample test, both by Monte Carlo) and each
    coordinate's variance is no larger (K = 10 conditional draws: clearly smaller)."""
    torch.manual_seed(4)
    problem = Problem(LATENTS[latent]())
    rao, _, _ = problem.estimate(make("gumbel_rao", problem.latent, k=10), DRAWS, tau=0.5)
    st, _, _ = problem.estimate(make("st_gumbel_softmax", problem.latent), DRAWS, tau=0.5)
    se = (rao.var(0) / len(rao) + st.var(0) / len(st)).sqrt()
    z = (rao.mean(0) - st.mean(0)).abs() / (se + 1e-12)
    assert (z < Z_MAX).all(), f"max |z| = {z.max():.1f}"
    assert (rao.var(0) <= st.var(0) * 1.02).all() and rao.var(0).sum() < 0.9 * st.var(0).sum()


def test_the_mean_test_tells_gumbel_rao_from_plain_straight_through():
    torch.manual_seed(4)
    problem = Problem(LATENTS["categorical"]())
    rao, _, _ = problem.estimate(make("gumbel_rao", problem.latent, k=10), DRAWS, tau=0.5)
    st, _, _ = problem.estimate(make("straight_through", problem.latent), DRAWS, tau=0.5)
    se = (rao.var(0) / len(rao) + st.var(0) / len(st)).sqrt()
    assert ((rao.mean(0) - st.mean(0)).abs() / se).max() > Z_MAX


def softmax_jacobian(p: torch.Tensor) -> torch.Tensor:
    """diag(p) - p p^T for each distribution on the last axis: (..., K, K)."""
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def per_code_gradients(problem: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every code D: q(D), df/dD, and df/dW at D."""
    codes = problem.codes()
    q = problem.latent.log_prob(codes, problem.logits.expand(len(codes), *problem.latent.shape)).exp()
    z = codes.clone().requires_grad_()
    w = problem.w.expand(len(codes), *problem.w.shape).clone().requires_grad_()
    g_z, g_w = torch.autograd.grad(problem.f(z, w).sum(), [z, w])
    return codes, q, g_z, g_w


def formula_expectation(problem: Problem, grad_given_code) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over codes D of q(D) times the formula's logit gradient at D, and E[df/dW]."""
    codes, q, g_z, g_w = per_code_gradients(problem)
    grads = torch.stack([grad_given_code(d, g) for d, g in zip(codes, g_z, strict=True)])
    weight = q.view(-1, *[1] * (grads.dim() - 1))
    return (weight * grads).sum(0), (q.view(-1, 1, 1) * g_w).sum(0)


def reinmax_formula(problem: Problem, tau: float):
    """2 J(pi1) g - J(pi0) g / 2 per variable, pi0 = q, pi1 = (D + softmax(logits / tau)) / 2; a
    binary unit as two classes: the scalar (2 s1 (1 - s1) - s0 (1 - s0) / 2) g."""
    logits = problem.logits
    if isinstance(problem.latent, Categorical):
        pi0 = torch.softmax(logits, -1)

        def grad(d, g):
            pi1 = (d + torch.softmax(logits / tau, -1)) / 2
            return 2 * (softmax_jacobian(pi1) @ g.unsqueeze(-1)).squeeze(-1) - \
                0.5 * (softmax_jacobian(pi0) @ g.unsqueeze(-1)).squeeze(-1)
        return grad
    s0 = torch.sigmoid(logits)

    def binary_grad(d, g):
        s1 = (d + torch.sigmoid(logits / tau)) / 2
        return (2 * s1 * (1 - s1) - 0.5 * s0 * (1 - s0)) * g
    return binary_grad


def gst_formula(problem: Problem, tau: float, gap: float = 1.0):
    """J(softmax(logits~ / tau)) g / tau per variable, logits~ moved to a gap `gap` for class D."""
    logits = problem.logits

    def grad(d, g):
        top = logits.max(-1, keepdim=True).values
        moved = torch.where(d > 0, top, torch.minimum(logits, top - gap))
        return (softmax_jacobian(torch.softmax(moved / tau, -1)) @ g.unsqueeze(-1)).squeeze(-1) / tau
    return grad


@pytest.mark.parametrize(("name", "latent", "tau"), [
    ("reinmax", "categorical", 1.0), ("reinmax", "categorical", 1.5), ("reinmax", "bernoulli", 1.3),
    ("gapped_st", "categorical", 0.5), ("gapped_st", "categorical", 1.0),
])
def test_reinmax_and_gapped_st_match_their_formulas_expectation_computed_exactly(name, latent, tau):
    torch.manual_seed(5)
    problem = Problem(LATENTS[latent]())
    formula = reinmax_formula(problem, tau) if name == "reinmax" else gst_formula(problem, tau)
    exact_logits, exact_w = formula_expectation(problem, formula)
    estimator = make(name, problem.latent, **({"tau": None} if name == "reinmax" else {}))
    g_logits, g_w, _ = problem.estimate(estimator, DRAWS, tau=tau)
    assert_unbiased(g_logits, exact_logits)
    assert_unbiased(g_w, exact_w)
    assert not torch.allclose(exact_logits, problem.exact()[0], atol=1e-2)  # and both are biased


def reinmax_rao_by_jacobians(latent: Latent, logits: torch.Tensor, perturbed: torch.Tensor, g: torch.Tensor,
                             tau: float) -> torch.Tensor:
    """The stated formula with every Jacobian built as a matrix: 2 J_GR g - J(pi) g / 2, J_GR the
    mean over the draws' axis 0 of `perturbed` (theta_D + G_k) of J(softmax(. / tau)) / tau."""
    soft, pi = latent.relax(perturbed, tau), latent.probs(logits)
    if isinstance(latent, Categorical):
        j_gr, j_pi = softmax_jacobian(soft).mean(0) / tau, softmax_jacobian(pi)
        return (2 * (j_gr @ g.unsqueeze(-1)) - 0.5 * (j_pi @ g.unsqueeze(-1))).squeeze(-1)
    j_gr, j_pi = (soft * (1 - soft)).mean(0) / tau, pi * (1 - pi)  # a binary unit's 1x1 Jacobians
    return 2 * j_gr * g - 0.5 * j_pi * g


@pytest.mark.parametrize("latent", LATENTS)
def test_reinmax_rao_backward_is_its_stated_formula_with_the_same_draws(latent):
    """ReinMax-Rao's gradient, built from vector-Jacobian products, equals the formula computed with
    the Jacobian matrices, for the same sample D and the same conditional draws G_k."""
    lat, k, tau = LATENTS[latent](), 7, 0.8
    logits = torch.randn(32, *lat.shape, generator=torch.Generator().manual_seed(8)) * 1.5
    weights = torch.randn(32, *lat.shape)  # f(z) = sum(weights * z): its gradient at D is `weights`
    est = make("reinmax_rao", lat, k=k, tau=tau)
    batch = logits.clone().requires_grad_()
    torch.manual_seed(9)
    z = est.sample(batch, torch.tensor(1.0))
    (grad,) = torch.autograd.grad((weights * z).sum(), batch)
    torch.manual_seed(9)  # the same draws, in the estimator's order: D, then the K conditional draws
    d = lat.sample(logits)
    assert torch.equal(z.detach(), d)
    midpoint = lat.logits_of((d + lat.probs(logits)) / 2)
    perturbed = lat.conditional_perturbed(midpoint.unsqueeze(0), d.expand(k, *d.shape))
    assert (lat.harden(perturbed) == d).all()  # every draw is conditioned on D
    expected = reinmax_rao_by_jacobians(lat, logits, perturbed, weights, tau)
    torch.testing.assert_close(grad, expected)
    # ... and not plain ReinMax's (its midpoint Jacobian) for the same sample.
    torch.manual_seed(9)
    plain_logits = logits.clone().requires_grad_()
    plain_z = make("reinmax", lat, tau=tau).sample(plain_logits, torch.tensor(1.0))
    assert torch.equal(plain_z.detach(), d)
    (plain,) = torch.autograd.grad((weights * plain_z).sum(), plain_logits)
    assert not torch.allclose(grad, plain, atol=1e-3)


@pytest.mark.parametrize("latent", LATENTS)
def test_reinmax_rao_matches_its_formulas_expectation(latent):
    """Over draws of D ~ q and of the K conditional Gumbel draws, the mean gradient is
    sum_D q(D) [2 E[J_GR | D] g(D) - J(pi) g(D) / 2]: D summed exactly over the codes, E[J_GR | D]
    by 4,000 conditional draws per code (its own standard error enters the test)."""
    torch.manual_seed(10)
    problem = Problem(LATENTS[latent]())
    lat, tau, draws = problem.latent, 0.7, 4000
    codes, q, g_z, g_w = per_code_gradients(problem)
    logits = problem.logits
    per_code = []
    for d, g in zip(codes, g_z, strict=True):
        midpoint = lat.logits_of((d + lat.probs(logits)) / 2)
        perturbed = lat.conditional_perturbed(midpoint.unsqueeze(0), d.expand(draws, *d.shape))
        one = torch.stack([reinmax_rao_by_jacobians(lat, logits, p.unsqueeze(0), g, tau) for p in perturbed])
        per_code.append(one)
    per_code = torch.stack(per_code)  # (codes, draws, *shape)
    weight = q.view(-1, *[1] * (per_code.dim() - 2))
    reference = (weight * per_code.mean(1)).sum(0)
    reference_var = (weight ** 2 * per_code.var(1) / draws).sum(0)
    g_logits, g_w_est, _ = problem.estimate(make("reinmax_rao", lat, k=4, tau=tau), DRAWS)
    se = (g_logits.var(0) / len(g_logits) + reference_var).sqrt()
    z = (g_logits.mean(0) - reference).abs() / (se + 1e-12)
    assert (z < Z_MAX).all(), f"max |z| = {z.max():.1f}"
    assert_unbiased(g_w_est, (q.view(-1, 1, 1) * g_w).sum(0))
    assert not torch.allclose(reference, problem.exact()[0], atol=1e-2)  # biased, like ReinMax


@pytest.mark.parametrize("latent", LATENTS)
def test_decoupled_st_gs_samples_at_the_forward_temperature_and_backpropagates_at_the_backward_one(latent):
    lat = LATENTS[latent]()
    logits = torch.randn(lat.shape, generator=torch.Generator().manual_seed(6)) * 2
    est = make("decoupled_st_gs", lat, forward_tau=2.0, backward_tau=0.7)
    batch = logits.expand(50_000, *lat.shape).clone()
    z = est.sample(batch, torch.tensor(9.9)).detach()  # the schedule's tau is not used
    if isinstance(lat, Categorical):
        expected, seen = torch.softmax(logits / 2.0, -1), z.mean(0)
    else:
        expected, seen = torch.sigmoid(logits / 2.0), z.mean(0)
    assert torch.allclose(seen, expected, atol=0.015), (seen, expected)
    # Backward: for the same noise, the gradient of softmax(logits / tau_b + g) (sigmoid for bits).
    batch = logits.expand(64, *lat.shape).clone().requires_grad_()
    weights = torch.randn(64, *lat.shape)
    torch.manual_seed(7)
    (grad,) = torch.autograd.grad((weights * est.sample(batch, torch.tensor(1.0))).sum(), batch)
    torch.manual_seed(7)
    g = lat.noise(batch)
    reference = batch.detach().clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad((weights * lat.relax(reference / 0.7 + g, 1.0)).sum(), reference)
    torch.testing.assert_close(grad, expected_grad)


# -----------------------------------------------------------------------------
# the K-sample bound (task.objective=iwae): VIMCO, and the reparameterised estimators inside it


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("latent", LATENTS)
def test_vimco_is_unbiased_for_the_k_sample_bound(latent, k):
    torch.manual_seed(12)
    problem = Problem(LATENTS[latent]())
    exact_logits, exact_w = problem.exact_bound(k)
    g_logits, g_w, _ = problem.estimate_bound(make("vimco", problem.latent), DRAWS, k)
    assert_unbiased(g_logits, exact_logits)
    assert_unbiased(g_w, exact_w)


def test_the_bound_check_detects_a_gradient_of_the_wrong_objective():
    # VIMCO's draws against the single-sample objective's exact gradient: they differ.
    torch.manual_seed(12)
    problem = Problem(LATENTS["categorical"]())
    exact_logits, _ = problem.exact_bound(1)
    g_logits, _, _ = problem.estimate_bound(make("vimco", problem.latent), DRAWS, 3)
    with pytest.raises(AssertionError):
        assert_unbiased(g_logits, exact_logits)


def test_vimco_backward_is_the_leave_one_out_formula():
    """For one batch of draws: sample k's signal is L - L_-k, L_-k the log-mean of the weights with
    the k-th replaced by the geometric mean of the others; plus the gradient of L itself."""
    problem, k = Problem(LATENTS["categorical"]()), 3
    torch.manual_seed(13)
    g_logits, _, bound = problem.estimate_bound(make("vimco", problem.latent), 8, k)
    codes = problem.seen[0].view(8, k, *problem.latent.shape)
    logits = problem.logits.expand(8, *problem.latent.shape).clone().requires_grad_()
    w = problem.w.expand(8, *problem.w.shape)
    expected = torch.zeros_like(logits)
    for b in range(8):
        log_w = torch.stack([problem.log_weight(codes[b, j:j + 1], w[b:b + 1], logits[b:b + 1])[0]
                             for j in range(k)])
        big_l = torch.logsumexp(log_w, 0) - math.log(k)
        assert torch.isclose(-big_l, bound[b])
        signal = []
        for j in range(k):
            others = torch.cat([log_w[:j], log_w[j + 1:]]).detach()
            swapped = torch.cat([others, others.mean().view(1)])
            signal.append(big_l.detach() - (torch.logsumexp(swapped, 0) - math.log(k)))
        log_q = torch.stack([problem.latent.log_prob(codes[b, j:j + 1], logits[b:b + 1])[0]
                             for j in range(k)])
        (g,) = torch.autograd.grad(-(torch.stack(signal) * log_q).sum() - big_l, logits)
        expected += g
    torch.testing.assert_close(g_logits, expected)


@pytest.mark.parametrize("latent", LATENTS)
def test_a_hard_forward_estimator_gives_the_k_sample_bound_and_its_unbiased_decoder_gradient(latent):
    """Straight-through's codes are exact samples, so inside the K-sample objective its value is the
    bound at those codes, and the decoder's gradient (pathwise at fixed codes) is unbiased for the
    bound's: E over draws equals the exact gradient in W by enumeration of K-tuples."""
    torch.manual_seed(14)
    problem, k = Problem(LATENTS[latent]()), 2
    _, exact_w = problem.exact_bound(k)
    _, g_w, bound = problem.estimate_bound(make("straight_through", problem.latent), DRAWS, k)
    assert_unbiased(g_w, exact_w)
    codes = problem.seen[0]
    assert ((codes == 0) | (codes == 1)).all()
    w = repeat_rows(problem.w.expand(DRAWS, *problem.w.shape), k, 0)
    logits = repeat_rows(problem.logits.expand(DRAWS, *problem.latent.shape), k, 0)
    log_w = problem.log_weight(codes, w, logits).view(DRAWS, k)
    torch.testing.assert_close(bound, math.log(k) - torch.logsumexp(log_w, -1))


def test_the_k_sample_objective_with_relaxed_samples_differentiates_the_bound_at_them():
    """Gumbel-Softmax inside the bound: the gradient is that of -log (1/K) sum_k w(y_k) at the
    relaxed codes y_k (drawn again with the same noise), the log-weight's terms linear in the code."""
    problem, k, tau = Problem(LATENTS["categorical"]()), 3, 0.6
    torch.manual_seed(15)
    g_logits, g_w, _ = problem.estimate_bound(make("gumbel_softmax", problem.latent), 5, k, tau=tau)
    logits = problem.logits.expand(5, *problem.latent.shape).clone().requires_grad_()
    w = problem.w.expand(5, *problem.w.shape).clone().requires_grad_()
    rows = repeat_rows(logits, k, 0)
    torch.manual_seed(15)
    y = problem.latent.relax(rows + problem.latent.noise(rows), tau)
    log_w = problem.log_weight(y, repeat_rows(w, k, 0), rows).view(5, k)
    expected = torch.autograd.grad((math.log(k) - torch.logsumexp(log_w, -1)).sum(), [logits, w])
    torch.testing.assert_close(g_logits, expected[0])
    torch.testing.assert_close(g_w, expected[1])


# -----------------------------------------------------------------------------
# baseline and normalization state


def test_baseline_and_scale_come_from_the_previous_batches_then_update():
    estimator = make("score_function", LATENTS["categorical"](), decay=0.8, min_var=1.0)
    signal, scale = estimator.centre(torch.tensor([10.0, 14.0]))  # mean 12, variance 4
    # No history: centred and scaled by the batch itself.
    torch.testing.assert_close(signal, torch.tensor([-2.0, 2.0]))
    torch.testing.assert_close(scale, torch.tensor(0.5))
    signal, scale = estimator.centre(torch.tensor([20.0, 20.0]))  # mean 20, variance 0
    # Centred by the average before this batch (12), scaled by its variance (4).
    torch.testing.assert_close(signal, torch.tensor([8.0, 8.0]))
    torch.testing.assert_close(scale, torch.tensor(0.5))
    torch.testing.assert_close(estimator.mean, torch.tensor(0.8 * 12 + 0.2 * 20))
    torch.testing.assert_close(estimator.var, torch.tensor(0.8 * 4 + 0.2 * 0))


@pytest.mark.parametrize("latent", MODELS)
@pytest.mark.parametrize("name", ["score_function", "darn", "muprop"])
def test_normalization_scales_the_kl_gradient_of_the_encoder_too(name, latent):
    # Mnih & Gregor normalize a learning signal that includes the KL terms: the encoder's whole
    # gradient is scaled. Here: f = 0 leaves only the analytic KL, whose gradient must come out
    # multiplied by the scale (per variable for DARN), and the decoder's gradient untouched.
    cfg = validate(compose_config([*MODELS[latent], "model.hidden=[16]", *estimator_overrides(name)]))
    model = VAE(cfg.model, cfg.data.image_shape)
    estimator = build_estimator(cfg.estimator, model.latent)
    scale = fixed_normalization(estimator, baseline=0.0, var=16.0)
    logits = torch.randn(5, *model.latent.shape, requires_grad=True)
    (kl_grad,) = torch.autograd.grad(model.latent.kl(logits, model.prior_logits).mean(), logits)
    surrogate, _ = estimator(logits, torch.tensor(1.0), lambda z: 0.0 * model.latent.flatten(z).sum(-1))
    kl = model.latent.kl(logits, model.prior_logits)
    (grad,) = torch.autograd.grad((surrogate + kl).mean(), logits)
    torch.testing.assert_close(grad, scale * kl_grad)


def test_each_estimator_has_a_typed_config_with_its_name_and_checks_its_ranges():
    for name, cls in ESTIMATORS.items():
        cfg = cls.config()
        assert cfg.name == name and isinstance(cfg, EstimatorConfig)
        cfg.check("estimator")  # the defaults are allowed
    with pytest.raises(ConfigError, match=r"estimator.decay=1.5 is not allowed: must be in \[0, 1\)"):
        ESTIMATORS["muprop"].config(decay=1.5).check("estimator")


# -----------------------------------------------------------------------------
# every estimator in the real objective and trainer


@pytest.mark.parametrize(("name", "latent"), COMBINATIONS)
def test_estimator_trains_the_vae_without_host_reads(name, latent):
    torch.manual_seed(7)
    cfg = validate(compose_config([*MODELS[latent], "model.hidden=[16]", *estimator_overrides(name)]))
    model = VAE(cfg.model, cfg.data.image_shape, cfg.task)
    estimator = build_estimator(cfg.estimator, model.latent)
    x = (torch.rand(8, cfg.data.num_pixels) < 0.3).float()
    with NoHostReads():
        for _ in range(2):  # the second call uses the moving averages of the first
            model.zero_grad()
            loss, stats = model.training_loss(estimator, x, torch.tensor(0.7))
            loss.backward()
    assert loss.isfinite() and stats.values.isfinite().all()
    for part in (model.encoder, model.decoder):
        grads = torch.cat([p.grad.flatten() for p in part.parameters()])
        assert grads.isfinite().all() and grads.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize(("name", "latent"), COMBINATIONS)
def test_estimator_runs_in_the_trainer(name, latent, mnist_root, tmp_path: Path):
    # Images on: the traversal grid must work for binary codes too.
    cfg = compose_config([*TINY, *MODELS[latent], "model.hidden=[32]", *estimator_overrides(name),
                          "train.max_steps=20", "train.eval_every=10", "eval.images=true"])
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "complete" and metrics["step"] == 20
    assert all(math.isfinite(metrics[k]) for k in ("val_nelbo_best", "test_nelbo", "test_bound"))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize(("name", "latent"), COMBINATIONS)
def test_estimator_runs_in_a_captured_cuda_step(name, latent, mnist_root):
    cfg = compose_config([*TINY, *MODELS[latent], *estimator_overrides(name), "device=cuda",
                          "train.compile=graph"])
    engine = build_engine([validate(cfg)], [None])
    stats = torch.stack([engine.train_step().values for _ in range(5)])
    assert stats.isfinite().all()


COMPILED = [("score_function", []), ("darn", []), ("muprop", []), ("rebar", ["estimator.learn=true"]),
            ("relax", []), ("vimco", ["task.objective=iwae"]), ("gumbel_softmax", ["task.objective=iwae"]),
            ("reinmax_rao", [])]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), COMPILED, ids=[" ".join([n, *o]) for n, o in COMPILED])
def test_compiled_step_matches_eager_step_where_the_estimator_differentiates(name, options, mnist_root):
    # These estimators differentiate inside the step (autograd.grad; twice for a learned control
    # variate, whose step the compile modes then run uncompiled), rescale the encoder's gradient with
    # a hook, or take K samples
    # per example: torch.compile must neither drop the hook nor reuse a compiled graph's saved tensors
    # (DARN once got wrong decoder gradients that way).
    def step_twice(mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch._dynamo.reset()
        cfg = compose_config([*TINY, "model.hidden=[32]", f"estimator={name}", *options,
                              f"train.compile={mode}", "seed=3", "optim=sgd", "optim.lr=0.01"])
        engine = build_engine([validate(cfg)], [None])
        stats = torch.stack([engine.train_step().values for _ in range(2)])
        return stats, [p.grad.clone() for p in engine.runs[0].model.parameters()]

    with torch._inductor.config.patch(fallback_random=True):  # the same noise in both
        eager_parts, eager_grads = step_twice("eager")
        compiled_parts, compiled_grads = step_twice("compile")
    torch.testing.assert_close(compiled_parts, eager_parts, rtol=1e-4, atol=1e-3)
    for compiled, eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)
