"""gvae's gradient estimators in a model of your own: no Hydra, no trainer, torch alone.

    import torch
    from gvae.api import estimator

    # A layer of 20 categorical variables with 10 classes: logits (batch, 20, 10).
    st = estimator("st_gumbel_softmax", "categorical", num_vars=20, num_classes=10)
    z = st.sample(logits, tau=0.5)            # reparameterised: a sample with the right gradient
    loss = my_loss(z).mean()                  # ... through anything differentiable in z

    # Any estimator, score-function ones included: give it the loss as a function of the code.
    rloo = estimator("rloo", "bernoulli", num_vars=200, k=4)       # 200 binary units, 4 samples
    surrogate, value = rloo(logits, tau=1.0, f=lambda z: my_loss(z))
    surrogate.mean().backward()               # its gradient is the estimator's; value is f at the sample

    # The K-sample importance-weighted bound, from each code's negative log-weight:
    vimco = estimator("vimco", "categorical", num_vars=20, num_classes=10)
    surrogate, bound = k_sample(vimco, logits, tau=1.0, f=neg_log_weight, k=5)

`f` maps a code, (batch, num_vars, num_classes) one-hot or (batch, num_vars) in {0, 1}, to one loss
per example (batch,): the learning signal of the score-function estimators, evaluated at as many
codes as the estimator needs (`cost(name)` says how many). Options are each estimator's typed config
(`options(name)` gives its dataclass and defaults, the same as `estimator.*` in the trainer's
configs), checked when the estimator is made. An estimator with a learned control variate (`rebar`
with learn=True, `relax`) has parameters: give them to your optimizer with your model's, and its
surrogate hands them the variance's gradient in the same backward pass. Estimators with moving
baselines (`score_function`, `darn`, `muprop`) keep them in buffers: it is an nn.Module, so move it
with `.to(device)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gvae.estimators import ESTIMATORS, Estimator, EstimatorConfig, estimator_cost
from gvae.latents import Bernoulli, Categorical, Latent
from gvae.objective import repeat_rows

__all__ = ["Estimator", "cost", "estimator", "k_sample", "names", "options"]


def names() -> list[str]:
    """Every registered estimator's name."""
    return sorted(ESTIMATORS)


def options(name: str) -> type[EstimatorConfig]:
    """The estimator's typed options: a dataclass whose defaults are the trainer's."""
    return ESTIMATORS[_known(name)].config


def cost(name: str) -> str:
    """Decoder (f) evaluations per call, in words: "1 decoder pass", "k = 2 decoder passes"."""
    return estimator_cost(ESTIMATORS[_known(name)])


def estimator(name: str, latent: str | Latent, num_vars: int | None = None, num_classes: int | None = None,
              **option_values) -> Estimator:
    """The estimator `name` for a layer of `num_vars` variables: `latent` "categorical" (with
    `num_classes`) or "bernoulli", or a gvae.latents.Latent. Keyword options override its defaults
    (options(name)); out-of-range values and a latent it is not defined for are a ConfigError."""
    cfg = options(name)(**option_values)
    cfg.check("options")
    if isinstance(latent, str):
        if num_vars is None or num_vars < 1:
            raise ValueError(f"num_vars={num_vars!r}: the layer's number of variables, >= 1")
        if latent == "categorical":
            if num_classes is None or num_classes < 2:
                raise ValueError(f"num_classes={num_classes!r}: a categorical layer's classes, >= 2")
            latent = Categorical(num_vars, num_classes)
        elif latent == "bernoulli":
            latent = Bernoulli(num_vars)
        else:
            raise ValueError(f"latent={latent!r}: 'categorical' or 'bernoulli'")
    cfg.check_latent("latent", "bernoulli" if isinstance(latent, Bernoulli) else "categorical")
    return ESTIMATORS[name](latent, cfg)


def k_sample(est: Estimator, logits: torch.Tensor, tau: float | torch.Tensor,
             f: Callable[[torch.Tensor], torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K-sample bound -log (1/K) sum_k w_k per example, for `vimco` or a reparameterised
    estimator: `f` gives -log w of a code for the rows of each example's K samples (its inputs repeated
    with gvae.objective.repeat_rows(x, k, 0)). Returns (surrogate, bound), (batch,) each: the surrogate's
    mean carries the gradient."""
    if "iwae" not in est.objectives:
        raise ValueError(f"{est.name} estimates the single-sample objective's gradient, not the K-sample "
                         f"bound's: use vimco or a reparameterised estimator ({', '.join(_multi())})")
    return est.multi_sample(repeat_rows(logits, k, 0), torch.as_tensor(tau, device=logits.device), f, k)


def _multi() -> list[str]:
    return sorted(n for n, c in ESTIMATORS.items() if "iwae" in c.objectives)


def _known(name: str) -> str:
    if name not in ESTIMATORS:
        raise ValueError(f"no estimator {name!r}; one of {', '.join(names())}")
    return name
