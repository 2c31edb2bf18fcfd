"""Gradient estimators for discrete latents, behind one interface.

An estimator gets the encoder's logits, the temperature and `f`, the per-example loss as a
function of a code (the reconstruction NLL). It returns a surrogate whose mean has the
estimator's gradient, and f's value at the sample. Adding an estimator: a subclass with
@register("name") here, plus configs/estimator/name.yaml.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gvae.latents import Latent

LossFn = Callable[[torch.Tensor], torch.Tensor]
ESTIMATORS: dict[str, type[Estimator]] = {}


def register(name: str):
    """Class decorator: make an estimator selectable as `estimator=name`."""

    def add(cls: type[Estimator]) -> type[Estimator]:
        ESTIMATORS[name] = cls
        cls.name = name
        return cls

    return add


class Estimator(nn.Module):
    """Base class. Subclasses implement `forward`; state (baselines) lives in buffers."""

    name: str

    def __init__(self, latent: Latent):
        super().__init__()
        self.latent = latent

    def forward(
        self, logits: torch.Tensor, tau: torch.Tensor, f: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (surrogate, value), both (B,): surrogate.mean() carries the gradient estimate,
        value is f at the sampled code, detached, for logging."""
        raise NotImplementedError


class Reparameterized(Estimator):
    """Estimators that are a sample with the right gradient: the surrogate is f(sample)."""

    def sample(self, logits: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits, tau, f):
        value = f(self.sample(logits, tau))
        return value, value.detach()


@register("gumbel_softmax")
class GumbelSoftmax(Reparameterized):
    """Relaxed Gumbel-Softmax / binary Concrete sample (Jang et al. 2017; Maddison et al. 2017)."""

    def sample(self, logits, tau):
        return self.latent.relax(logits + self.latent.noise(logits), tau)


@register("st_gumbel_softmax")
class STGumbelSoftmax(Reparameterized):
    """Straight-through Gumbel-Softmax: exact sample forward, relaxed gradient backward (Jang et al. 2017)."""

    def sample(self, logits, tau):
        perturbed = logits + self.latent.noise(logits)
        soft = self.latent.relax(perturbed, tau)
        return self.latent.harden(perturbed) + soft - soft.detach()


def check_estimator_config(cfg: Mapping[str, Any]) -> tuple[type[Estimator], dict[str, Any]]:
    """The estimator class `cfg["name"]` and its options; ValueError naming a bad key."""
    options = dict(cfg)
    name = options.pop("name", None)
    if name not in ESTIMATORS:
        raise ValueError(f"estimator.name={name!r} is not allowed: one of {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "latent")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"estimator.{unknown[0]} is not an option of estimator {name!r}; its options: {allowed or 'none'}"
        )
    return cls, options


def build_estimator(cfg: Mapping[str, Any], latent: Latent) -> Estimator:
    """Build the estimator `cfg["name"]` with the rest of cfg as its options."""
    cls, options = check_estimator_config(cfg)
    return cls(latent, **options)
