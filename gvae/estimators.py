"""Gradient estimators for discrete latents, behind one interface, each with its typed options.

Importable with torch alone (no Hydra, no trainer): gvae/api.py is the public way in for your own
model. The trainer's configs name these schemas through Hydra (gvae.config.register_configs).

An estimator gets a stochastic layer's logits (the VAE's encoder's), the temperature and `f`, the
per-example loss as a function of a code (the VAE's reconstruction NLL; for a deeper layer of the
SBN, the rest of the network, gvae/tasks/sbn.py). It returns a surrogate whose mean has the
estimator's gradient, and f's value at the sample. Adding an estimator is one class here (or in
any imported module) and one configs/estimator/NAME.yaml:

    @dataclass
    class MyConfig(EstimatorConfig):          # its options, typed, with their defaults
        name: str = "mine"
        scale: float = per_run(1.0)           # per_run: the runs of one pack may differ in it

    @register(MyConfig)
    class Mine(Estimator): ...                # self.cfg is a MyConfig

and the YAML holds `defaults: [mine_schema, _self_]` (Hydra's structured-config schema pattern:
gvae.config.register_configs stores MyConfig in Hydra's ConfigStore as estimator/mine_schema).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from gvae.errors import require
from gvae.latents import Bernoulli, Latent
from gvae.objective import k_sample_bound
from gvae.roles import per_run

LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EstimatorConfig:
    """Base schema of the `estimator` group: the registered name; subclasses add their options."""

    name: str = "???"  # Hydra's MISSING: a schema's name is its option's
    latents: ClassVar[tuple[str, ...]] = ("categorical", "bernoulli")  # the latent types it is defined for
    other_latents_hint: ClassVar[str] = ""
    uses_temperature: ClassVar[bool] = False  # whether the schedule's tau changes its gradient
    # Decoder evaluations (a forward and a backward pass each) per step, the cost the papers compare
    # estimators at; an estimator whose cost is an option says so with the option's name.
    decoder_evaluations: ClassVar[str] = "1"

    def check(self, key: str) -> None:
        """Range checks of the options (their types are checked by the schema)."""
        require(self.name in ESTIMATORS, f"{key}.name", self.name, f"one of {sorted(ESTIMATORS)}")
        require(isinstance(self, ESTIMATORS[self.name].config), f"{key}.name", self.name,
                f"these options are {type(self).__name__}'s; choose another estimator with estimator=NAME")

    def qualifiers(self) -> list[str]:
        """What a table's estimator column adds to the name: options that change what it computes
        beyond a number (REBAR's learned control variate)."""
        return []

    def decoder_passes(self, objective: str, samples: int) -> int:
        """Decoder passes per step and stochastic layer under this objective (task.objective, with K =
        task.samples): the cost the papers compare estimators at."""
        cost = self.decoder_evaluations
        if cost == "task.samples":
            return samples
        passes = int(cost) if cost.isdigit() else getattr(self, cost)
        return passes * samples if objective == "iwae" else passes

    def check_objective(self, key: str, objective: str, samples: int) -> None:
        """ConfigError unless the estimator trains this objective (task.objective)."""
        allowed = ESTIMATORS[self.name].objectives
        multi = sorted(n for n, c in ESTIMATORS.items() if "iwae" in c.objectives)
        require(objective in allowed, "task.objective", objective,
                f"{key}={self.name} trains " + (
                    "the K-sample bound only: set task.objective=iwae" if "elbo" not in allowed else
                    f"the single-sample objective only; task.objective=iwae trains with {', '.join(multi)}"))

    def check_latent(self, key: str, latent: str) -> None:
        """ConfigError unless the estimator is defined for this latent type."""
        require(latent in self.latents, "model.latent", latent,
                f"{key}={self.name} is defined for {' and '.join(self.latents)} latents only"
                f"{self.other_latents_hint}")


ESTIMATORS: dict[str, type[Estimator]] = {}


def register(config: type[EstimatorConfig]):
    """Class decorator: make an estimator known by its config's name (gvae.api.estimator(NAME), and
    `estimator=NAME` in the trainer's configs), with `config` as its typed options."""
    name = config.name

    def add(cls: type[Estimator]) -> type[Estimator]:
        ESTIMATORS[name] = cls
        cls.name, cls.config = name, config
        return cls

    return add


class Estimator(nn.Module):
    """Base class. Subclasses implement `forward`; state (baselines) lives in buffers.

    Packed runs (gvae/packing.py) stack S runs along a leading dimension of every tensor (logits
    (S, B, ...), f's values (S, B)) and give one config per run (`runs`): read options through
    `option`, which gives a number, or per run a tensor that broadcasts, and reduce over the batch
    dimension `self.batch_dim` (0, or 1 when packed). Buffers then hold one entry per run.
    """

    name: str
    config: type[EstimatorConfig]
    objectives: ClassVar[tuple[str, ...]] = ("elbo",)  # the task objectives it trains (task.objective)
    whole_path: ClassVar[bool] = False  # its learning signal belongs to a whole sampled path (VIMCO)
    compilable: bool = True  # whether torch.compile can run its step (it cannot differentiate twice)

    def __init__(self, latent: Latent, cfg: EstimatorConfig, runs: list[EstimatorConfig] | None = None):
        super().__init__()
        self.latent, self.cfg = latent, cfg
        self.runs = runs or []
        self.batch_dim = 1 if runs else 0
        self.pack_shape = (len(runs),) if runs else ()
        self._options: dict[tuple, torch.Tensor] = {}

    def option(self, name: str, like: torch.Tensor):
        """The option `name`: a number, or, when packed runs differ in it, a tensor (S, 1, ..., 1)
        on `like`'s device that broadcasts against it (made once: a captured graph may not copy)."""
        values = [getattr(cfg, name) for cfg in self.runs] or [getattr(self.cfg, name)]
        if all(v == values[0] for v in values):
            return values[0]
        key = (name, like.dim(), like.device)
        if key not in self._options:
            shape = (len(values),) + (1,) * (like.dim() - 1)
            self._options[key] = torch.tensor(values, dtype=torch.float32, device=like.device).view(shape)
        return self._options[key]

    def forward(
        self, logits: torch.Tensor, tau: torch.Tensor, f: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (surrogate, value), both (B,) (or (S, B) packed): surrogate.mean(-1) carries the
        gradient estimate, value is f at the sampled code, detached, for logging."""
        raise NotImplementedError

    def multi_sample(self, logits: torch.Tensor, tau: torch.Tensor, f: LossFn,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K-sample objective (task.objective=iwae): `logits` holds each example's logits K times
        (gvae.objective.repeat_rows) and f is -log w of a code. Return (surrogate, bound), (..., B)
        each: surrogate.mean(-1) carries the gradient estimate of the bound -log (1/K) sum_k w_k,
        bound is its value at the samples, detached."""
        raise NotImplementedError


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """`hard` forward, the gradient of `soft` backward.

    The parentheses matter: soft - soft.detach() is exactly 0, so the forward value is exactly
    `hard`, whereas (hard + soft) - soft.detach() is off by a rounding error.
    """
    return hard + (soft - soft.detach())


# -----------------------------------------------------------------------------
# estimators that are a sample with the right gradient


class Reparameterized(Estimator):
    """Estimators that are a sample with the right gradient: the surrogate is f(sample). In the
    K-sample bound each of the K samples is one, and the bound is differentiated through them."""

    objectives = ("elbo", "iwae")

    def sample(self, logits: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits, tau, f):
        value = f(self.sample(logits, tau))
        return value, value.detach()

    def multi_sample(self, logits, tau, f, k):
        bound = k_sample_bound(f(self.sample(logits, tau)), k)
        return bound, bound.detach()


@dataclass
class GumbelSoftmaxConfig(EstimatorConfig):
    name: str = "gumbel_softmax"
    uses_temperature: ClassVar[bool] = True


@register(GumbelSoftmaxConfig)
class GumbelSoftmax(Reparameterized):
    """Relaxed Gumbel-Softmax / binary Concrete sample (Jang et al. 2017; Maddison et al. 2017)."""

    def sample(self, logits, tau):
        return self.latent.relax(logits + self.latent.noise(logits), tau)


@dataclass
class STGumbelSoftmaxConfig(EstimatorConfig):
    name: str = "st_gumbel_softmax"
    uses_temperature: ClassVar[bool] = True


@register(STGumbelSoftmaxConfig)
class STGumbelSoftmax(Reparameterized):
    """Straight-through Gumbel-Softmax: exact sample forward, relaxed gradient backward (Jang et al. 2017)."""

    def sample(self, logits, tau):
        perturbed = logits + self.latent.noise(logits)
        return straight_through(self.latent.harden(perturbed), self.latent.relax(perturbed, tau))


@dataclass
class StraightThroughConfig(EstimatorConfig):
    name: str = "straight_through"


@register(StraightThroughConfig)
class StraightThrough(Reparameterized):
    """Straight-through: exact sample forward, gradient of the mean code p backward (Bengio et al. 2013).

    z = hard + p - p.detach() with p = softmax(logits) or sigmoid(logits); for a binary unit
    this is Bengio et al.'s identity ST (d z / d p = 1).
    """

    def soft(self, logits: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return self.latent.probs(logits)

    def sample(self, logits, tau):
        return straight_through(self.latent.sample(logits.detach()), self.soft(logits, tau))


@dataclass
class SlopeAnnealedSTConfig(EstimatorConfig):
    name: str = "slope_annealed_st"
    uses_temperature: ClassVar[bool] = True


@register(SlopeAnnealedSTConfig)
class SlopeAnnealedST(StraightThrough):
    """Slope-annealed straight-through, slope 1/tau following the temperature schedule (Chung et al. 2016).

    Forward an exact sample; backward through softmax(logits / tau) or sigmoid(logits / tau):
    the steeper the slope, the closer the backward function is to the hard sample.
    """

    def soft(self, logits, tau):
        return self.latent.relax(logits, tau)


# -----------------------------------------------------------------------------
# score-function estimators: exact samples, f(z) times the gradient of log q(z)


@dataclass
class ScoreFunctionOptions(EstimatorConfig):
    """Options of the score-function estimators: `decay` of the moving averages (0.8, the alpha of
    Mnih & Gregor) and `min_var`: the scale is 1 / sqrt(max(var, min_var)); 1.0 gives Mnih &
    Gregor's 1 / max(1, std)."""

    decay: float = per_run(0.8)
    min_var: float = per_run(1.0)

    def check(self, key: str) -> None:
        super().check(key)
        require(0.0 <= self.decay < 1.0, f"{key}.decay", self.decay, "must be in [0, 1)")
        require(self.min_var > 0.0, f"{key}.min_var", self.min_var, "must be > 0")


class ScoreFunctionBase(Estimator):
    """A learning signal times grad log q(z), centred by a moving-average baseline, with variance
    normalization (Mnih & Gregor 2014): the encoder's gradient divided by a moving estimate of the
    learning signal's standard deviation.

    In Mnih & Gregor the KL terms are part of the learning signal, so normalization rescales the
    encoder's whole gradient; here the objective adds the KL analytically, so to keep the two
    terms in proportion the scale is applied to the total gradient reaching the logits (KL
    included) by a hook. The decoder's gradient is not rescaled. Options: ScoreFunctionOptions.
    """

    per_variable = False  # one learning signal per example, or one per latent variable

    def __init__(self, latent: Latent, cfg: ScoreFunctionOptions,
                 runs: list[ScoreFunctionOptions] | None = None):
        super().__init__(latent, cfg, runs)
        shape = self.pack_shape + ((latent.num_vars,) if self.per_variable else ())
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @property
    def min_var(self):
        return self.option("min_var", self.mean)

    def centre(self, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (signal - b, s), s = 1 / sqrt(max(v, min_var)), then update b and v.

        b and v are the moving mean and variance from before this batch, so a batch is never
        centred by its own values (which would bias it); the first batch, with no history,
        starts them from its own statistics. torch.where instead of an `if`: no host sync.
        """
        signal, batch = signal.detach(), self.batch_dim
        batch_mean, batch_var = signal.mean(batch), signal.var(batch, unbiased=False)
        mean = torch.where(self.started, self.mean, batch_mean)
        var = torch.where(self.started, self.var, batch_var)
        decay = self.option("decay", mean)
        self.mean.copy_(torch.lerp(batch_mean, mean, decay))  # decay * old + (1 - decay) * new
        self.var.copy_(torch.lerp(batch_var, var, decay))
        self.started.fill_(True)
        return signal - mean.unsqueeze(batch), var.clamp(min=self.min_var).rsqrt()

    def scale_encoder_gradient(self, logits: torch.Tensor, scale: torch.Tensor) -> None:
        """Multiply the whole gradient reaching `logits` (this estimator's and the KL's) by `scale`,
        per variable when the scale has one entry per variable."""
        if logits.requires_grad:  # a property of the tensor, not its value: no host sync
            scale = scale.unsqueeze(self.batch_dim)  # (S,) 1, (variables)
            scale = scale.reshape(scale.shape + (1,) * (logits.dim() - scale.dim()))
            logits.register_hook(lambda grad: grad * scale)

    def code_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a code-shaped tensor over all its components: (B,)."""
        return self.latent.flatten(t).sum(-1)


@dataclass
class ScoreFunctionConfig(ScoreFunctionOptions):
    name: str = "score_function"


@register(ScoreFunctionConfig)
class ScoreFunction(ScoreFunctionBase):
    """REINFORCE, moving-average baseline and variance normalization (Williams 1992; Mnih & Gregor 2014).

    Encoder gradient: s * [(f(z) - b) grad log q(z) + grad KL], z ~ q, s = 1 / sqrt(max(v,
    min_var)). With b and s fixed it is s times an unbiased estimate: the baseline only reduces
    variance, normalization sets the encoder's step. Decoder gradient: grad f(z).
    """

    def forward(self, logits, tau, f):
        z = self.latent.sample(logits.detach())
        value = f(z)
        signal, scale = self.centre(value)
        self.scale_encoder_gradient(logits, scale)
        return value + signal * self.latent.log_prob(z, logits), value.detach()


EXPANSION_POINTS = ("sample", "center")  # DARN's `expand_at`


@dataclass
class DARNConfig(ScoreFunctionOptions):
    name: str = "darn"
    decoder_evaluations: ClassVar[str] = "2"
    # The expansion point c_j, the same number in every coordinate of the code; null: the centre of
    # the latent's values (1/K per class, 1/2 for a binary unit). MuProp's authors tried 1/2, 1/k and
    # the mean for categorical units (Gu et al. 2016); the paper does not say which its DARN used.
    # Not per run: a pack whose runs differed in it would mix null and numbers in one tensor.
    center: float | None = None
    # Where df/dz is taken: at the sample (Gregor et al.'s expansion of f(z) - f(z with z_j at c_j)
    # around z), or at the expansion point itself, every coordinate at c (the derivative of a
    # deterministic pass, as MuProp takes its own at the mean code). The papers that compare DARN
    # do not say which their implementation used. Not per run, as for `center`.
    expand_at: str = "sample"

    def check(self, key: str) -> None:
        super().check(key)
        require(self.center is None or 0.0 <= self.center <= 1.0, f"{key}.center", self.center,
                "must be in [0, 1] (or null: the centre of the latent's values)")
        require(self.expand_at in EXPANSION_POINTS, f"{key}.expand_at", self.expand_at,
                f"must be one of {', '.join(EXPANSION_POINTS)}")


@register(DARNConfig)
class DARN(ScoreFunctionBase):
    """DARN: per-variable learning signal from a first-order Taylor expansion (Gregor et al. 2014).

    What is implemented, for variable j of a sample z ~ q: the learning signal is
    f(z) - f(z with z_j at the centre c_j), approximated to first order around the sample:
        L_j = df/dz_j(z) . (z_j - c_j),
    c_j = 1/2 for a binary unit (Gregor et al.) and the uniform vector 1/K for a one-hot variable
    (our generalisation; it is 1/2 per class for K = 2), or the option `center` in every
    coordinate. With `expand_at=center` the derivative is taken at the code c instead of at z:
    L_j = df/dz_j(c) . (z_j - c_j). Encoder gradient of variable j:
    s_j [(L_j - b_j) grad log q(z_j) + grad KL_j], with a baseline b_j and scale s_j per
    variable. There is no analytic correction, so it is exact only for f linear in z (then any
    centre gives the exact gradient); otherwise biased. Decoder gradient: grad f(z).
    """

    per_variable = True

    def forward(self, logits, tau, f):
        z = self.latent.sample(logits.detach())
        centre = self.latent.center(logits.detach()) if self.cfg.center is None else self.cfg.center
        # df/dz from a pass of its own: a compiled graph differentiated twice (with retain_graph)
        # gave wrong decoder gradients under torch.compile.
        at = z if self.cfg.expand_at == "sample" else torch.zeros_like(z) + centre
        probe = at.clone().requires_grad_()
        (grad,) = torch.autograd.grad(f(probe).sum(), probe)
        value = f(z)
        signal, scale = self.centre(self.latent.per_var(grad * (z - centre)))
        self.scale_encoder_gradient(logits, scale)
        surrogate = value + (signal * self.latent.log_prob_vars(z, logits)).sum(-1)
        return surrogate, value.detach()


@dataclass
class MuPropConfig(ScoreFunctionOptions):
    name: str = "muprop"
    decoder_evaluations: ClassVar[str] = "2"


@register(MuPropConfig)
class MuProp(ScoreFunctionBase):
    """MuProp: first-order Taylor expansion at the mean code as control variate (Gu et al. 2016).

    What is implemented, for z ~ q and the mean code mu = E_q[z] (softmax or sigmoid of the
    logits), with f and its gradient evaluated at mu by a deterministic (mean-field) pass:
        h(z) = f(mu) + f'(mu) . (z - mu),   residual r = f(z) - h(z),
        encoder gradient = s * [(r - b) grad log q(z) + f'(mu) . grad mu + grad KL],
    the second term being the gradient of E_q[h(z)] = f(mu) + f'(mu) . (E_q[z] - mu) through q
    (f(mu), f'(mu) held fixed), which makes it unbiased: with b and s fixed it is s times an
    unbiased estimate. s = 1 / sqrt(max(v, min_var)) from the moving variance of the residual.
    Decoder gradient: grad f(z).
    """

    def forward(self, logits, tau, f):
        z = self.latent.sample(logits.detach())
        value = f(z)
        mu = self.latent.probs(logits)
        mu_fixed = mu.detach().requires_grad_()
        f_mu = f(mu_fixed)
        (grad_mu,) = torch.autograd.grad(f_mu.sum(), mu_fixed)  # f'(mu); no decoder gradient from here
        taylor = f_mu.detach() + self.code_sum(grad_mu * (z - mu_fixed.detach()))
        signal, scale = self.centre(value - taylor)
        self.scale_encoder_gradient(logits, scale)
        surrogate = value + signal * self.latent.log_prob(z, logits) + self.code_sum(grad_mu * mu)
        return surrogate, value.detach()


# -----------------------------------------------------------------------------
# estimators since the paper


@dataclass
class ReinMaxConfig(EstimatorConfig):
    name: str = "reinmax"
    uses_temperature: ClassVar[bool] = True
    # ReinMax's own temperature (its authors use tau >= 1); null: the schedule's
    tau: float | None = per_run(1.0)

    def check(self, key: str) -> None:
        super().check(key)
        require(self.tau is None or self.tau > 0, f"{key}.tau", self.tau, "must be > 0 (or null)")


@register(ReinMaxConfig)
class ReinMax(Reparameterized):
    """ReinMax: a second-order straight-through estimator (Liu et al., NeurIPS 2023).

    Forward an exact sample D ~ q. With pi0 = softmax(logits) and pi1 = (D + softmax(logits /
    tau)) / 2, the gradient reaching the logits is 2 (diag(pi1) - pi1 pi1^T) g - (1/2) (diag(pi0)
    - pi0 pi0^T) g, g the loss's gradient at D. Built as the sample plus a zero-valued surrogate:
    2 softmax(logits + c) - pi0 / 2, c = log pi1 - logits held fixed (so softmax(logits + c) = pi1
    and its Jacobian is that of the softmax at pi1). A binary unit is the two-class case: sigmoid
    in place of softmax (the Jacobian pi (1 - pi)). `tau`: ReinMax's temperature; null follows the
    schedule.
    """

    def sample(self, logits, tau):
        tau = tau if self.cfg.tau is None else self.option("tau", logits)
        latent = self.latent
        z = latent.sample(logits.detach())
        pi0 = latent.probs(logits)
        pi1 = (z + latent.relax(logits, tau).detach()) / 2
        tilted = latent.probs(logits + (latent.logits_of(pi1) - logits).detach())
        return straight_through(z, 2 * tilted - pi0 / 2)


@dataclass
class ReinMaxRaoConfig(EstimatorConfig):
    name: str = "reinmax_rao"
    uses_temperature: ClassVar[bool] = True
    tau: float | None = per_run(1.0)  # as ReinMax's; null: the schedule's
    k: int = 100  # conditional Gumbel draws per sample (its authors' code: 100)

    def check(self, key: str) -> None:
        super().check(key)
        require(self.k >= 1, f"{key}.k", self.k, "must be >= 1")
        require(self.tau is None or self.tau > 0, f"{key}.tau", self.tau, "must be > 0 (or null)")


@register(ReinMaxRaoConfig)
class ReinMaxRao(Reparameterized):
    """ReinMax-Rao: ReinMax with a Gumbel-Rao first-order term (Wang & Bui, arXiv 2603.08257, 2026).

    As its first author's code computes it (../shared/docs/reference.md; the paper's method section
    was not readable): forward an exact sample D ~ q, pi = softmax(logits); backward
        2 J_GR g - (1/2) J(pi) g,   J_GR = (1/K) sum_k J(softmax((theta_D + G_k) / tau)) / tau,
    J(p) = diag(p) - p p^T, theta_D = log((pi + D) / 2) (ReinMax's midpoint) and G_k Gumbel noise
    drawn given argmax(theta_D + G) = D, held fixed (gradients pass through neither). That is
    ReinMax with its midpoint Jacobian J(pi1) replaced by the Gumbel-Rao Jacobian at theta_D. (The
    code's third term J(pi) g_pi is the gradient through pi of the analytic KL, which gvae's
    objectives add themselves.) Built as vector-Jacobian products, never a Jacobian: the gradient of
    2 mean_k softmax((logits + c_k) / tau) - pi / 2 with c_k = theta_D + G_k - logits held fixed,
    O(B N K C) memory where the authors' code materialises K C x C matrices per variable. A binary
    unit is the two-class case (sigmoid, logistic noise given the sign). `tau`: null follows the
    schedule; `k`: K.
    """

    def sample(self, logits, tau):
        tau = tau if self.cfg.tau is None else self.option("tau", logits)
        latent, d, k = self.latent, self.batch_dim, self.cfg.k  # the K draws go where the batch starts
        fixed = logits.detach()
        z = latent.sample(fixed)
        pi = latent.probs(logits)
        midpoint = latent.logits_of((z + pi.detach()) / 2).unsqueeze(d)
        draws = z.unsqueeze(d).expand(*z.shape[:d], k, *z.shape[d:])
        shift = (latent.conditional_perturbed(midpoint, draws) - fixed.unsqueeze(d)).detach()
        tau = tau.unsqueeze(d) if torch.is_tensor(tau) and tau.dim() > 0 else tau
        rao = latent.relax(logits.unsqueeze(d) + shift, tau).mean(d)
        return straight_through(z, 2 * rao - pi / 2)


@dataclass
class GumbelRaoConfig(EstimatorConfig):
    name: str = "gumbel_rao"
    uses_temperature: ClassVar[bool] = True
    k: int = 10  # Gumbel draws per sample

    def check(self, key: str) -> None:
        super().check(key)
        require(self.k >= 1, f"{key}.k", self.k, "must be >= 1")


@register(GumbelRaoConfig)
class GumbelRao(Reparameterized):
    """Gumbel-Rao Monte Carlo, GR-MC K (Paulus, Maddison & Krause, ICLR 2021).

    Forward the exact sample D = argmax(logits + G). Backward the straight-through Gumbel-Softmax
    gradient averaged over K draws of the noise given D: the gradient of
    (1/K) sum_k softmax((logits + G_k) / tau), G_k ~ p(G | argmax(logits + G) = D) drawn top-down
    (Latent.conditional_perturbed) and held fixed, so it is the conditional expectation of
    st_gumbel_softmax's gradient given D estimated by K draws: the same mean, no more variance.
    A binary unit: logistic noise given its sign, sigmoid in place of softmax.
    """

    def sample(self, logits, tau):
        latent, d = self.latent, self.batch_dim  # the K draws go where the batch starts
        perturbed = logits + latent.noise(logits)
        z = latent.harden(perturbed).detach()
        draws = z.unsqueeze(d).expand(*z.shape[:d], self.cfg.k, *z.shape[d:])
        fixed = logits.detach().unsqueeze(d)
        noise = (latent.conditional_perturbed(fixed, draws) - fixed).detach()
        tau = tau.unsqueeze(d) if torch.is_tensor(tau) and tau.dim() > 0 else tau
        soft = latent.relax(logits.unsqueeze(d) + noise, tau).mean(d)
        return straight_through(z, soft)


@dataclass
class GappedSTConfig(EstimatorConfig):
    name: str = "gapped_st"
    uses_temperature: ClassVar[bool] = True
    gap: float = per_run(1.0)  # kappa: GST-1.0
    latents: ClassVar[tuple[str, ...]] = ("categorical",)
    other_latents_hint: ClassVar[str] = " (its authors define it for categorical variables only)"

    def check(self, key: str) -> None:
        super().check(key)
        require(self.gap >= 0, f"{key}.gap", self.gap, "must be >= 0")


@register(GappedSTConfig)
class GappedST(Reparameterized):
    """Gapped straight-through, GST-1.0 (Fan, Chi, Rudnicky & Ramadge, ICML 2022).

    Forward an exact sample D ~ q (class i). Backward through softmax(logits~ / tau), logits~ the
    logits moved, with the move held fixed, as little as makes class i lead by `gap` (kappa):
    logits~_i = max_k logits_k and logits~_j = min(logits_j, max_k logits_k - kappa) for j != i.
    tau follows the schedule. As its authors' code does (chijames/GST); their paper's text was
    not available to check against. Categorical latents only.
    """

    def sample(self, logits, tau):
        fixed = logits.detach()
        z = self.latent.sample(fixed)
        top = fixed.max(dim=-1, keepdim=True).values
        moved = torch.where(z > 0, top, torch.minimum(fixed, top - self.option("gap", fixed)))
        return straight_through(z, self.latent.relax(logits + (moved - fixed), tau))


@dataclass
class DecoupledSTGSConfig(EstimatorConfig):
    name: str = "decoupled_st_gs"
    uses_temperature: ClassVar[bool] = True
    forward_tau: float = per_run(1.0)  # the sample's temperature: 1 draws from q itself
    backward_tau: float | None = per_run(None)  # the relaxation's; null: the schedule's

    def check(self, key: str) -> None:
        super().check(key)
        require(self.forward_tau > 0, f"{key}.forward_tau", self.forward_tau, "must be > 0")
        require(self.backward_tau is None or self.backward_tau > 0, f"{key}.backward_tau", self.backward_tau,
                "must be > 0 (or null: the schedule's temperature)")


@register(DecoupledSTGSConfig)
class DecoupledSTGS(Reparameterized):
    """Straight-through Gumbel-Softmax with separate forward and backward temperatures (Shah, Yan,
    Mozer & Liu, arXiv 2410.13331, 2024).

    With one Gumbel (logistic for binary units) draw g: forward the hard sample
    one_hot(argmax(logits / tau_f + g)), a draw from softmax(logits / tau_f); backward the
    gradient of softmax(logits / tau_b + g). The temperatures divide the logits, not logits + g,
    so that tau_f changes the sample (with (logits + g) / tau_f it would not). This follows the
    description of the paper's Algorithm 1 in its ICLR 2025 reviews; the paper's own text was not
    available to check against. tau_f = `forward_tau` (1: exact samples from q), tau_b =
    `backward_tau` (null: the schedule's); the paper's analysis used tau_f = 1.6, tau_b = 1.3.
    """

    def sample(self, logits, tau):
        tau_b = tau if self.cfg.backward_tau is None else self.option("backward_tau", logits)
        g = self.latent.noise(logits)
        z = self.latent.harden(logits.detach() / self.option("forward_tau", logits) + g)
        return straight_through(z, self.latent.relax(logits / tau_b + g, 1.0))


@dataclass
class DisARMConfig(EstimatorConfig):
    name: str = "disarm"
    decoder_evaluations: ClassVar[str] = "2"
    latents: ClassVar[tuple[str, ...]] = ("bernoulli",)
    other_latents_hint: ClassVar[str] = (" (model=bernoulli); for a categorical latent use another unbiased "
                                         "estimator: rebar, muprop or score_function")


@register(DisARMConfig)
class DisARM(Estimator):
    """DisARM: antithetic, unbiased, for binary latents (Dong, Mnih & Tucker, NeurIPS 2020).

    One uniform u per variable gives the pair b = 1[u < sigma(logits)], b~ = 1[1 - u < sigma(logits)].
    Encoder gradient of variable j: (1/2) (f(b) - f(b~)) (-1)^(b~_j) 1[b_j != b~_j] sigma(|logits_j|),
    unbiased for d E_q[f] / d logits_j. Decoder gradient: (1/2) (grad f(b) + grad f(b~)), unbiased
    too; the value reported is f(b). Defined for binary units only: with a
    categorical latent it is a configuration error (no categorical counterpart is implemented).
    """

    def __init__(self, latent: Latent, cfg: DisARMConfig, runs: list[DisARMConfig] | None = None):
        super().__init__(latent, cfg, runs)
        if not isinstance(latent, Bernoulli):
            cfg.check_latent("estimator", "categorical")  # raises, naming what to use instead

    def forward(self, logits, tau, f):
        u = self.latent.uniform(logits.shape, logits.device)
        p = torch.sigmoid(logits.detach())
        b, b_anti = (u < p).float(), (1 - u < p).float()
        f_b, f_anti = f(b), f(b_anti)
        sign = torch.where(b_anti > 0, -1.0, 1.0)
        weight = sign * (b != b_anti).float() * torch.sigmoid(logits.detach().abs())
        grad = 0.5 * (f_b - f_anti).detach().unsqueeze(-1) * weight
        return 0.5 * (f_b + f_anti) + (grad * logits).sum(-1), f_b.detach()


@dataclass
class RelaxationControlOptions(EstimatorConfig):
    """Options of the control variates built from the relaxation (REBAR, RELAX)."""

    decoder_evaluations: ClassVar[str] = "3"
    temperature: float = per_run(0.5)  # lambda of the relaxation in the control variate (learned: its start)
    eta: float = per_run(1.0)  # the control variate's scale (learned: its start)

    def check(self, key: str) -> None:
        super().check(key)
        require(self.temperature > 0, f"{key}.temperature", self.temperature, "must be > 0")


@dataclass
class REBARConfig(RelaxationControlOptions):
    name: str = "rebar"
    # Learn eta and log lambda by gradient descent on the estimator's variance, as REBAR's paper does;
    # false: the fixed values above. Not per run: it changes what the step computes.
    learn: bool = False

    def qualifiers(self) -> list[str]:
        return ["learned"] if self.learn else []


@register(REBARConfig)
class REBAR(Estimator):
    """REBAR: the score function with a control variate built from the continuous relaxation,
    unbiased (Tucker, Mnih, Maddison, Lawson & Sohl-Dickstein, NeurIPS 2017, arXiv 1703.07370).

    With z = logits + G (Gumbel or logistic noise), b = H(z) the exact sample, z~ ~ p(z | b)
    reparameterized in the logits (Latent.conditional_perturbed) and the control variate
    c(z) = eta f(s(z)), s(.) = softmax(. / lambda) (sigmoid for binary units), the encoder gradient is
        [f(b) - c(z~)] grad log q(b) + grad c(z) - grad c(z~),
    the last two terms differentiated through z and z~ and taken for the logits only (the decoder's
    gradient is grad f(b)). `temperature` (lambda) and `eta` are fixed, or with `learn` the starting
    values of eta and log lambda, trained by minimising the estimator's variance (below).

    Learning the control variate (REBAR's paper; as its authors' code for RELAX,
    duvenaud/relax, binary_vae_multilayer_per_layer.py, computes it for REBAR and RELAX alike): the
    variance objective is the mean over the batch and the logits' coordinates of the squared
    gradient estimate reaching the logits (each example's, divided by the batch size: the gradient
    of the batch's mean loss), whose mean does not depend on the control variate, so minimising
    its second moment minimises its variance. It is differentiated in the control variate's own
    parameters (second order, through the decoder), and that gradient is handed to the run's
    optimizer with its other gradients (its learning rate: the authors' code scales it by 1 or 10).
    One eta and one lambda per stochastic layer, eta unconstrained, as in that code. Differences
    from Tucker et al.'s own REBAR code (tensorflow/models, research/rebar): it learns an eta per
    parameter tensor, an input-dependent baseline, and minimises the variance of the gradient of
    every model parameter, with a shifted relaxation; and it reuses z's noise for z~.
    """

    def __init__(self, latent: Latent, cfg: RelaxationControlOptions,
                 runs: list[RelaxationControlOptions] | None = None):
        super().__init__(latent, cfg, runs)
        self.learned = self.learns(cfg)
        if self.learned:  # made with the pack's shape; a pack copies its runs' values in
            self.eta = nn.Parameter(torch.full(self.pack_shape, float(cfg.eta)))
            self.log_temperature = nn.Parameter(torch.full(self.pack_shape, math.log(cfg.temperature)))

    @staticmethod
    def learns(cfg: RelaxationControlOptions) -> bool:
        """Whether the control variate is learned (REBAR: the `learn` option)."""
        return cfg.learn

    def per_run(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A parameter with one value per run, shaped to broadcast against `like` (S, B, ...)."""
        return t.view(*t.shape, *[1] * (like.dim() - t.dim())) if self.pack_shape else t

    def control(self, f: LossFn, perturbed: torch.Tensor, lam, eta) -> torch.Tensor:
        """c(z) per example for perturbed logits z: eta f(s(z))."""
        return eta * f(self.latent.relax(perturbed, lam))

    def control_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    @property
    def compilable(self) -> bool:
        # torch.compile cannot differentiate its graphs twice (aot_autograd), as learning the control
        # variate does: the compile modes then run the step eagerly (gvae/step.py).
        return not self.learned

    def forward(self, logits, tau, f):
        latent = self.latent
        perturbed = logits + latent.noise(logits)
        b = latent.harden(perturbed).detach()
        value = f(b)
        if self.learned:
            lam = self.per_run(self.log_temperature.exp(), logits)
            eta = self.per_run(self.eta, value)
        else:
            lam, eta = self.option("temperature", logits), self.option("eta", value)
        relaxed = self.control(f, perturbed, lam, eta)
        conditioned = self.control(f, latent.conditional_perturbed(logits, b), lam, eta)
        signal = value.detach() - conditioned
        surrogate = value + signal.detach() * latent.log_prob(b, logits)
        if logits.requires_grad:  # the control variate's pathwise terms, for the logits only
            (pathwise,) = torch.autograd.grad((relaxed - conditioned).sum(), logits, retain_graph=True,
                                              create_graph=self.learned)
            surrogate = surrogate + latent.flatten(pathwise.detach() * logits).sum(-1)
            if self.learned:
                # The gradient estimate reaching each example's logits: grad log q(b) = b - E_q[b].
                score = b - latent.probs(logits.detach())
                estimate = signal.view(*signal.shape, *[1] * (score.dim() - signal.dim())) * score + pathwise
                surrogate = surrogate + self.variance_step(estimate / estimate.shape[self.batch_dim])
        return surrogate, value.detach()

    def variance_step(self, grad: torch.Tensor) -> torch.Tensor:
        """A zero-valued term, per run, whose gradient in the control variate's parameters is that of
        the mean square of `grad` (each run's own): added to the surrogate, it hands the variance's
        gradient to the optimizer in the same backward pass as the model's."""
        dims = tuple(range(self.batch_dim, grad.dim()))
        variance = grad.square().mean(dims)  # (S,) or ()
        params = self.control_parameters()
        grads = torch.autograd.grad(variance.sum(), params, retain_graph=True)
        step = sum((p * g.detach()).reshape(*self.pack_shape, -1).sum(-1)
                   for p, g in zip(params, grads, strict=True))
        step = step - step.detach()
        return step.unsqueeze(-1) if self.pack_shape else step


@dataclass
class RELAXConfig(RelaxationControlOptions):
    name: str = "relax"
    hidden: list[int] = field(default_factory=lambda: [200, 200])  # r_rho's ReLU layers

    def check(self, key: str) -> None:
        super().check(key)
        require(all(h >= 1 for h in self.hidden), f"{key}.hidden", list(self.hidden),
                "layer sizes must be >= 1")


@register(RELAXConfig)
class RELAX(REBAR):
    """RELAX: REBAR's estimator with a learned surrogate, c(z) = eta f(s(z)) + r_rho(z), unbiased
    (Grathwohl, Choi, Wu, Roeder & Duvenaud, ICLR 2018, arXiv 1711.00123; its discrete-latent
    estimator, Algorithm 2).

    r_rho is a small ReLU network (`hidden`: 200, 200 by default, as the authors' code,
    duvenaud/relax, binary_vae_multilayer_per_layer.py, uses with depth 2; one per stochastic layer)
    of the perturbed logits z, the relaxation's unrelaxed input as in that code; rho, eta and log
    lambda are trained together on the estimator's variance (REBAR's docstring says how). The
    paper writes c = f(s(z)) + r_rho(z) and learns rho and lambda; the code learns eta too and
    scales r_rho by it (the same family), and also feeds r_rho the image and the earlier layers'
    samples, which gvae's estimators do not see (they get the logits and f). With r_rho = 0 it is
    REBAR with `learn`.
    """

    def __init__(self, latent: Latent, cfg: RELAXConfig, runs: list[RELAXConfig] | None = None):
        super().__init__(latent, cfg, runs)
        sizes = [latent.code_size, *cfg.hidden, 1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1 / math.sqrt(n_in)  # nn.Linear's initialisation
            weight = torch.empty(*self.pack_shape, n_in, n_out).uniform_(-bound, bound)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.empty(*self.pack_shape, n_out).uniform_(-bound, bound)))

    @staticmethod
    def learns(cfg: RelaxationControlOptions) -> bool:
        return True  # RELAX always learns its surrogate

    def surrogate_net(self, perturbed: torch.Tensor) -> torch.Tensor:
        """r_rho(z) per example: (S, B, in) @ (S, in, out) in a pack, one product for all its runs."""
        h = self.latent.flatten(perturbed)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.matmul(h, w) + (b.unsqueeze(-2) if self.pack_shape else b)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h.squeeze(-1)

    def control(self, f, perturbed, lam, eta):
        return eta * f(self.latent.relax(perturbed, lam)) + self.surrogate_net(perturbed)


@dataclass
class RLOOConfig(EstimatorConfig):
    name: str = "rloo"
    # Samples per example. Not per run: it sets how many decoder passes the step makes.
    k: int = 2
    decoder_evaluations: ClassVar[str] = "k"

    def check(self, key: str) -> None:
        super().check(key)
        require(self.k >= 2, f"{key}.k", self.k, "must be >= 2 (each sample's baseline is the others' mean)")


@register(RLOOConfig)
class RLOO(Estimator):
    """REINFORCE leave-one-out: K samples, each centred by the others' mean, unbiased (Kool et al. 2019).

    For z_1, ..., z_K ~ q drawn independently, the encoder gradient is
        (1/K) sum_k (f(z_k) - b_k) grad log q(z_k),   b_k = 1/(K-1) sum_{j != k} f(z_j),
    which is (1/(K-1)) sum_k (f(z_k) - mean_j f(z_j)) grad log q(z_k). Each b_k is independent of
    z_k, so each term is unbiased (Kool, van Hoof & Welling, "Buy 4 REINFORCE samples, get a
    baseline for free!", ICLR 2019 workshop; VIMCO's baselines are the same idea for the K-sample
    bound). No moving averages and no variance normalization: the baseline the DisARM, ARMS and
    double-CV papers compare against. Decoder gradient: (1/K) sum_k grad f(z_k). The value reported
    is f(z_1). K = `k` (2: DisARM's cost).
    """

    def forward(self, logits, tau, f):
        k = self.cfg.k
        codes = [self.latent.sample(logits.detach()) for _ in range(k)]
        values = [f(z) for z in codes]
        # The encoder gradient in pairs: 1/(K(K-1)) sum_{i<j} (f(z_i) - f(z_j)) (z_i - z_j), since
        # for both latents grad_logits log q(z) = z - E_q[z], so a pair's difference of scores is
        # z_i - z_j exactly, and exactly 0 in a variable where the two codes agree. The centred form
        # leaves rounding there, which Adam magnifies into steps where the gradient is otherwise ~0.
        grad = torch.zeros_like(logits)
        for i in range(k):
            for j in range(i + 1, k):
                difference = (values[i] - values[j]).detach()
                grad = grad + difference.view(difference.shape + (1,) * (logits.dim() - difference.dim())) \
                    * (codes[i] - codes[j])
        pathwise = torch.stack(values).mean(0)  # the decoder's gradient
        return pathwise + self.latent.flatten(grad / (k * (k - 1)) * logits).sum(-1), values[0].detach()


@dataclass
class VIMCOConfig(EstimatorConfig):
    name: str = "vimco"
    decoder_evaluations: ClassVar[str] = "task.samples"  # K, the objective's samples

    def check_objective(self, key: str, objective: str, samples: int) -> None:
        super().check_objective(key, objective, samples)
        require(samples >= 2, "task.samples", samples,
                f"{key}={self.name} centres each sample by the other K - 1: K must be >= 2")


@register(VIMCOConfig)
class VIMCO(Estimator):
    """VIMCO: the K-sample bound's score-function gradient with a leave-one-out baseline per sample
    (Mnih & Rezende, "Variational inference for Monte Carlo objectives", ICML 2016, arXiv 1602.06725).

    With K exact samples z_k ~ q per example, log-weights l_k = log p(x, z_k) - log q(z_k | x) and
    L = log (1/K) sum_k exp(l_k), the gradient estimate of L is
        sum_k (L - L_-k) grad log q(z_k) + sum_k w~_k grad l_k,   w~_k = exp(l_k) / sum_j exp(l_j),
    L_-k = log (1/K) (sum_{j != k} exp(l_j) + exp(mean_{j != k} l_j)): L with l_k replaced by the
    others' mean (the geometric mean of their weights), which does not depend on z_k, so each
    baseline leaves the estimate unbiased. The second sum is autograd's gradient of L itself
    (pathwise in the decoder and prior, directly in log q's logits). It trains the K-sample bound
    only (task.objective=iwae, K = task.samples >= 2); no moving averages, no normalization. In the
    structured-output SBN the signal is the whole path's: every layer's log-probability gets it.
    """

    objectives = ("iwae",)
    whole_path = True

    def forward(self, logits, tau, f):
        raise TypeError("estimator=vimco trains the K-sample bound (task.objective=iwae): "
                        "call multi_sample")

    def multi_sample(self, logits, tau, f, k):
        z = self.latent.sample(logits.detach())
        return self.joint_surrogate(f(z), self.latent.log_prob(z, logits), k)

    @staticmethod
    def joint_surrogate(neg_log_weights: torch.Tensor, log_q: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(surrogate, bound) per example from -l_k and log q(z_k) of exact samples, (..., B * K) with
        an example's K samples adjacent; -log w carries its pathwise and direct gradients."""
        log_w = -neg_log_weights.view(*neg_log_weights.shape[:-1], -1, k)  # (..., B, K)
        bound = math.log(k) - torch.logsumexp(log_w, dim=-1)  # -L
        fixed = log_w.detach()
        others_mean = (fixed.sum(-1, keepdim=True) - fixed) / (k - 1)
        # Row k: the log-weights with the k-th replaced by the others' mean; L_-k is its log-mean-exp.
        swapped = torch.where(torch.eye(k, dtype=torch.bool, device=fixed.device),
                              others_mean.unsqueeze(-1), fixed.unsqueeze(-2))
        leave_one_out = torch.logsumexp(swapped, dim=-1) - math.log(k)  # (..., B, K)
        signal = (-bound.detach()).unsqueeze(-1) - leave_one_out
        score = (signal * log_q.view(*log_q.shape[:-1], -1, k)).sum(-1)
        return bound - score, bound.detach()


def estimator_cost(cls: type[Estimator]) -> str:
    """Decoder evaluations per step, in words: "1 decoder pass", "k = 2 decoder passes", "K =
    task.samples decoder passes"."""
    cost = cls.config.decoder_evaluations
    if "." in cost:  # another group's key
        cost = f"K = {cost}"
    elif not cost.isdigit():  # an option's name: its default
        cost = f"{cost} = {getattr(cls.config(), cost)}"
    return f"{cost} decoder pass" + ("" if cost == "1" else "es")


def estimator_help() -> str:
    """One line per registered estimator: its name, its cost per step and its docstring's first line."""
    width = max(map(len, ESTIMATORS))
    costs = {name: f"[{estimator_cost(cls)}]" for name, cls in ESTIMATORS.items()}
    cost_width = max(map(len, costs.values()))
    lines = [f"{name:<{width}}  {costs[name]:<{cost_width}}  {(cls.__doc__ or '').strip().splitlines()[0]}"
             for name, cls in sorted(ESTIMATORS.items())]
    return "\n".join([*lines, "Decoder passes are per stochastic layer: in task=sbn each of a layer's passes "
                                "runs the layers below it, so the counts multiply. With task.objective=iwae "
                                "(the K-sample bound) a reparameterised estimator makes its passes for "
                                "each of the K = task.samples samples; vimco trains that objective only. "
                                "rebar with estimator.learn=true and relax add a second-order pass through "
                                "their three (the variance's gradient)."])


def build_estimator(cfg: EstimatorConfig, latent: Latent,
                    runs: list[EstimatorConfig] | None = None) -> Estimator:
    """The estimator that `cfg` (its typed options) names, for `latent`; for packed runs, `runs`
    holds each run's options."""
    return ESTIMATORS[cfg.name](latent, cfg, runs)
