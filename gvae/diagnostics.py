"""The gradient microscope: an estimator's gradient of the objective with respect to the logits of
a task's first stochastic layer (the VAE's encoder logits), drawn many times on a fixed batch,
against a reference (exact, or unbiased with its error).

The objective of one image x is E_q[F(z)] + A(logits), q = q(. | logits) the first layer's
distribution, F the loss given its code (the VAE: -log p(x | z); the SBN: the rest of the network's
loss, averaged over the layers after the first) and A the part computed in closed form (the VAE's
KL(q(z | x) || p(z)); nothing for the SBN). Its gradient with respect to the logits is what an
estimator estimates (times the variance normalization's scale, for the score-function estimators:
what they deliver is what is measured). The task says what each of these is (gvae/tasks/).
- The exact reference sums over every code, when there are at most `max_codes` of them (8 classes
  x 4 variables: 4,096) and the task's F is exact.
- Otherwise the local expectation gradient (Titsias & Lazaro-Gredilla, NeurIPS 2015): for each
  variable j, sum its values exactly with the others sampled from q,
      d/d logits_jl = q_jl (F(z with z_j = l) - sum_k q_jk F(z with z_j = k)),
  (p (1 - p) (F(z_j = 1) - F(z_j = 0)) for a binary unit), averaged over `reference_draws` draws:
  unbiased (F sampled, when it is, stays unbiased), with a standard error.
A's gradient is analytic and added to both. Nothing here touches the training state: the
estimator is a copy (its moving baselines stay as they were) and the random streams are restored.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch

from gvae.config import DiagConfig
from gvae.latents import Bernoulli, Categorical
from gvae.tasks import Task


def estimator_draws(model: Task, estimator: torch.nn.Module, x: torch.Tensor, tau: torch.Tensor | float,
                    draws: int) -> torch.Tensor:
    """(draws, B, *latent shape): the estimator's gradient of each image's objective, per draw."""
    with torch.no_grad():
        logits = model.diag_logits(x)
    batch = logits.repeat(draws, *[1] * (logits.dim() - 1)).requires_grad_()
    images = x.repeat(draws, 1)
    tau = torch.as_tensor(tau, device=x.device)
    objective = model.diag_objective(estimator, batch, images, tau)
    (grad,) = torch.autograd.grad(objective.sum(), batch)  # each row's objective depends on its logits only
    return grad.view(draws, *logits.shape)


def _all_codes(model: Task, device: torch.device) -> torch.Tensor:
    latent = model.diag_latent()
    values = torch.tensor(list(itertools.product(range(latent.num_values), repeat=latent.num_vars)),
                          device=device)
    if isinstance(latent, Categorical):
        return torch.nn.functional.one_hot(values, latent.num_values).float()
    return values.float()


def _analytic_gradient(model: Task, logits: torch.Tensor) -> torch.Tensor:
    leaf = logits.detach().requires_grad_()
    value = model.analytic(leaf).sum()
    if not value.requires_grad:  # nothing in closed form (the SBN's)
        return torch.zeros_like(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return grad


def exact_gradient(model: Task, x: torch.Tensor) -> torch.Tensor:
    """d/d logits of E_q[F] + A for each image, by summing over every code: (B, *latent shape)."""
    with torch.no_grad():
        logits = model.diag_logits(x)
        codes = _all_codes(model, x.device)
        f = model.expected_loss(x, codes.unsqueeze(1)).T  # (B, C)
    leaf = logits.requires_grad_()
    log_q = model.diag_latent().log_prob(codes.unsqueeze(0), leaf.unsqueeze(1))  # (B, C)
    (grad,) = torch.autograd.grad((log_q.exp() * f).sum(), leaf)
    return grad + _analytic_gradient(model, logits)


def local_expectation_gradient(model: Task, x: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard error) over `draws` draws of the local expectation gradient, A included."""
    latent = model.diag_latent()
    with torch.no_grad():
        logits = model.diag_logits(x)
        q = latent.probs(logits)
        z = latent.sample(logits.expand(draws, *logits.shape))  # (S, B, *shape)
        per_draw = torch.zeros_like(z)
        for j in range(latent.num_vars):
            f = []
            for value in range(latent.num_values):
                code = z.clone()
                if isinstance(latent, Categorical):
                    code[..., j, :] = 0.0
                    code[..., j, value] = 1.0
                else:
                    code[..., j] = float(value)
                f.append(model.expected_loss(x, code))
            f = torch.stack(f, dim=-1)  # (S, B, values)
            if isinstance(latent, Bernoulli):
                p = q[:, j]
                per_draw[..., j] = p * (1 - p) * (f[..., 1] - f[..., 0])
            else:
                qj = q[:, j]  # (B, K)
                per_draw[..., j, :] = qj * (f - (qj * f).sum(-1, keepdim=True))
    mean = per_draw.mean(0) + _analytic_gradient(model, logits)
    return mean, per_draw.std(0) / math.sqrt(draws)


def reference_gradient(
    model: Task, x: torch.Tensor, cfg: DiagConfig
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(reference, its standard error, "exact" or "local expectation")."""
    latent = model.diag_latent()
    if model.exact_microscope and latent.num_values ** latent.num_vars <= cfg.max_codes:
        exact = exact_gradient(model, x)
        return exact, torch.zeros_like(exact), "exact"
    mean, se = local_expectation_gradient(model, x, cfg.reference_draws)
    return mean, se, "local expectation"


def summarize(draws: torch.Tensor, reference: torch.Tensor, reference_se: torch.Tensor) -> dict[str, float]:
    """The microscope's figures, the batch taken as one vector:
    - bias: |mean - reference| / |reference|, and bias_noise: what that ratio would be for an
      unbiased estimator from the draws' and the reference's own noise alone,
    - variance: the trace of one draw's covariance, per image,
    - cosine: of the mean with the reference,
    - snr: |mean| / sqrt(trace of one draw's covariance),
    - reference_error: |reference's standard error| / |reference| (0 when exact)."""
    r = len(draws)
    mean, var = draws.mean(0).flatten(), draws.var(0).flatten()
    ref, ref_se = reference.flatten(), reference_se.flatten()
    norm = ref.norm().clamp(min=1e-30)
    return {
        "bias": ((mean - ref).norm() / norm).item(),
        "bias_noise": ((var / r + ref_se**2).sum().sqrt() / norm).item(),
        "variance": (var.sum() / draws.shape[1]).item(),
        "cosine": torch.nn.functional.cosine_similarity(mean, ref, dim=0).item(),
        "snr": (mean.norm() / var.sum().sqrt().clamp(min=1e-30)).item(),
        "reference_error": (ref_se.norm() / norm).item(),
    }


def diagnose(model: Task, estimator: torch.nn.Module, x: torch.Tensor, tau: torch.Tensor | float,
             cfg: DiagConfig) -> dict[str, float]:
    """The microscope's figures for `estimator` on images x, leaving the training state as it was."""
    devices = [x.device] if x.device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            reference, reference_se, _ = reference_gradient(model, x, cfg)
            draws = estimator_draws(model, copy.deepcopy(estimator), x, tau, cfg.draws)
    finally:
        model.train(was_training)
    return summarize(draws, reference, reference_se)
