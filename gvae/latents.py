"""Discrete latent variables: sampling, relaxation, densities and the analytic KL.

A latent turns the encoder's flat output into logits of its own shape and knows everything
about its distribution; estimators and the objective only talk to this interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gvae.rng import CounterRNG


def _uniform(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """U(0,1) in float32 whatever the autocast dtype, kept away from 0 so no log ever sees 0.

    torch.rand gives multiples of 2**-24 in [0, 1); only 0 is moved (to float32's tiny), an event
    of probability 6e-8 whose effect on any sample statistic is far below measurement.
    """
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    return u.clamp_(min=torch.finfo(torch.float32).tiny)


class Latent:
    """N discrete variables; subclasses fix the distribution of each.

    Training noise comes from `rng` when the trainer sets one (a CounterRNG: the numbers depend on
    the run's seed and step only), else from torch's global generator; evaluation passes its own
    torch.Generator."""

    rng: CounterRNG | None = None
    num_vars: int
    num_values: int  # values each variable takes: K classes, or 2 for a binary unit
    num_logits: int  # encoder outputs
    code_size: int  # decoder inputs

    def logits(self, flat: torch.Tensor) -> torch.Tensor:
        """Encoder output (..., num_logits) to logits of the latent's own shape, in float32."""
        raise NotImplementedError

    def uniform(self, shape: torch.Size, device: torch.device,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """U(0, 1) float32 noise, never 0: from `generator` if given, else the trainer's rng."""
        if generator is None and self.rng is not None:
            return self.rng.uniform(shape)
        return _uniform(shape, device, generator)

    def noise(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise whose sum with the logits is an argmax (or sign) sample: Gumbel or logistic."""
        raise NotImplementedError

    def relax(self, perturbed: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
        """Relaxed sample from perturbed logits (logits + noise) at temperature tau."""
        raise NotImplementedError

    def harden(self, perturbed: torch.Tensor) -> torch.Tensor:
        """Exact sample (one-hot or {0,1}) from perturbed logits: the argmax, or the sign."""
        raise NotImplementedError

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean of the code under q: class probabilities, or P(z=1)."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log q(z) summed over variables: shape (B,). `logits` broadcasts against `z`, so codes
        of shape (m, B, ...) take one set of logits (B, ...) or the prior's (...)."""
        raise NotImplementedError

    def kl(self, logits: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
        """Analytic KL(q || p) summed over variables: shape (B,)."""
        raise NotImplementedError

    def one_value(self, code: torch.Tensor, var: int, value: int) -> torch.Tensor:
        """A copy of exact codes with variable `var` set to `value` (for traversals)."""
        raise NotImplementedError

    def log_prob_vars(self, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log q(z_j) of each variable: shape (B, N)."""
        raise NotImplementedError

    def per_var(self, t: torch.Tensor) -> torch.Tensor:
        """A code-shaped tensor summed over each variable's components: shape (B, N)."""
        raise NotImplementedError

    def center(self, logits: torch.Tensor) -> torch.Tensor:
        """The code with every variable at the centre of its values: 1/K per class, or 1/2."""
        raise NotImplementedError

    def logits_of(self, mean: torch.Tensor) -> torch.Tensor:
        """Logits whose mean code (`probs`) is `mean`: log p, or log p - log(1 - p)."""
        raise NotImplementedError

    def conditional_perturbed(self, logits: torch.Tensor, z: torch.Tensor,
                              generator: torch.Generator | None = None) -> torch.Tensor:
        """logits + noise drawn from the noise's distribution given that the exact sample is z
        (Maddison et al. 2014; Tucker et al. 2017, appendix), differentiable in the logits.
        `logits` may lack leading sample dimensions of z."""
        raise NotImplementedError

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact sample from q (no gradient)."""
        return self.harden(logits + self.noise(logits, generator))

    def flatten(self, z: torch.Tensor) -> torch.Tensor:
        """Code (..., *shape) to decoder input (..., code_size)."""
        return z.reshape(*z.shape[: z.dim() - len(self.shape)], self.code_size)


def _over_classes(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x, dim) over the last (class) axis. On the CPU through a transposed view: torch's CPU kernels
    vectorise a softmax over a non-last axis across the axis after it, but not over a last axis of a
    few classes, which runs element by element (scripts/bench.py --softmax measures the two). Compiled
    steps make their own kernels, and a returned view of a transpose trips AOTAutograd's aliasing."""
    if x.device.type != "cpu" or x.dim() < 2 or torch.compiler.is_compiling():
        return fn(x, dim=-1)
    return fn(x.transpose(-1, -2), dim=-2).transpose(-1, -2)


def softmax(x: torch.Tensor) -> torch.Tensor:
    return _over_classes(torch.softmax, x)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return _over_classes(torch.log_softmax, x)


class Categorical(Latent):
    """N categorical variables with K classes, one-hot codes; relaxation: Gumbel-Softmax."""

    def __init__(self, num_vars: int, num_classes: int):
        self.num_vars, self.num_values = num_vars, num_classes
        self.num_logits = self.code_size = num_vars * num_classes
        self.shape = (num_vars, num_classes)

    def logits(self, flat):
        return flat.float().view(*flat.shape[:-1], *self.shape)

    def noise(self, logits, generator=None):
        u = self.uniform(logits.shape, logits.device, generator)
        return -torch.log(-torch.log(u))

    def relax(self, perturbed, tau):
        return softmax(perturbed / tau)

    def harden(self, perturbed):
        index = perturbed.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(perturbed).scatter_(-1, index, 1.0)

    def probs(self, logits):
        return softmax(logits)

    def logits_of(self, mean):
        return torch.log(mean.clamp(min=torch.finfo(mean.dtype).tiny))

    def conditional_perturbed(self, logits, z, generator=None):
        # Top-down Gumbel sampling: the maximum is log Z plus a Gumbel, the others Gumbels truncated
        # below it. With E ~ Exp(1) per class and E_b that of the sampled class b:
        #   y_b = log Z - log E_b,   y_k = -log(E_k exp(-logits_k) + E_b / Z)  (k != b).
        e = -torch.log(self.uniform(z.shape, z.device, generator))
        e_b = (z * e).sum(-1, keepdim=True)
        log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
        top = log_z - torch.log(e_b)
        # The second operand made whole: broadcast along the classes, torch's CPU logaddexp runs element by
        # element (scripts/bench.py --softmax measures the two).
        sampled = (torch.log(e_b) - log_z).expand(e.shape).contiguous()
        others = -torch.logaddexp(torch.log(e) - logits, sampled)
        return z * top + (1 - z) * others

    def log_prob(self, z, logits):
        return (z * log_softmax(logits)).sum(dim=(-2, -1))

    def kl(self, logits, prior_logits):
        log_q = log_softmax(logits)
        log_p = log_softmax(prior_logits)
        return (log_q.exp() * (log_q - log_p)).sum(dim=(-2, -1))

    def one_value(self, code, var, value):
        code = code.clone()
        code[:, var] = F.one_hot(torch.tensor(value), self.num_values).to(code)
        return code

    def log_prob_vars(self, z, logits):
        return (z * log_softmax(logits)).sum(dim=-1)

    def per_var(self, t):
        return t.sum(dim=-1)

    def center(self, logits):
        return torch.full_like(logits, 1.0 / self.num_values)


class Bernoulli(Latent):
    """N binary variables with {0, 1} codes; relaxation: binary Concrete (logistic noise)."""

    def __init__(self, num_vars: int):
        self.num_vars, self.num_values = num_vars, 2
        self.num_logits = self.code_size = num_vars
        self.shape = (num_vars,)

    def logits(self, flat):
        return flat.float().view(*flat.shape[:-1], self.num_vars)

    def noise(self, logits, generator=None):
        u = self.uniform(logits.shape, logits.device, generator)
        return torch.log(u) - torch.log1p(-u)

    def relax(self, perturbed, tau):
        return torch.sigmoid(perturbed / tau)

    def harden(self, perturbed):
        return (perturbed > 0).to(perturbed.dtype)

    def probs(self, logits):
        return torch.sigmoid(logits)

    def logits_of(self, mean):
        eps = torch.finfo(mean.dtype).eps
        mean = mean.clamp(eps, 1 - eps)
        return torch.log(mean) - torch.log1p(-mean)

    def conditional_perturbed(self, logits, z, generator=None):
        # z = 1 exactly when the uniform u of the logistic noise log(u / (1 - u)) exceeds 1 - p, so
        # given z, u = 1 - p + v p (z = 1) or u = v (1 - p) (z = 0), v ~ U(0, 1); logs kept stable.
        v = self.uniform(z.shape, z.device, generator).clamp(max=1 - torch.finfo(torch.float32).eps)
        log_u1 = torch.log(torch.sigmoid(-logits) + v * torch.sigmoid(logits))
        log_not_u1 = F.logsigmoid(logits) + torch.log1p(-v)
        log_u0 = torch.log(v) + F.logsigmoid(-logits)
        log_not_u0 = torch.log1p(-v * torch.sigmoid(-logits))
        return logits + z * (log_u1 - log_not_u1) + (1 - z) * (log_u0 - log_not_u0)

    def log_prob(self, z, logits):
        # z log sigmoid(l) + (1 - z) log sigmoid(-l) = z l - softplus(l), written to broadcast.
        return (z * logits - F.softplus(logits)).sum(dim=-1)

    def kl(self, logits, prior_logits):
        q = torch.sigmoid(logits)
        kl = q * (F.logsigmoid(logits) - F.logsigmoid(prior_logits)) + (1 - q) * (
            F.logsigmoid(-logits) - F.logsigmoid(-prior_logits)
        )
        return kl.sum(dim=-1)

    def one_value(self, code, var, value):
        code = code.clone()
        code[:, var] = float(value)
        return code

    def log_prob_vars(self, z, logits):
        return -F.binary_cross_entropy_with_logits(logits, z, reduction="none")

    def per_var(self, t):
        return t

    def center(self, logits):
        return torch.full_like(logits, 0.5)

