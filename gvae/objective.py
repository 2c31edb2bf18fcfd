"""The objective and the bounds: negative ELBO for training, exact-sample bounds for evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gvae.estimators import Estimator
from gvae.model import VAE


def recon_nll(pixel_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood summed over pixels: shape (B,)."""
    return F.binary_cross_entropy_with_logits(pixel_logits.float(), x, reduction="none").sum(-1)


def training_loss(
    model: VAE, estimator: Estimator, x: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to minimise and its parts [loss, recon, kl] (batch means, detached).

    Negative ELBO = E_q[-log p(x|z)] + KL(q(z|x) || p(z)) (Kingma & Welling 2014). The KL is
    analytic, so only the reconstruction term goes through the estimator. With a relaxed
    sample the reconstruction term is evaluated at the relaxation and is not a bound.
    """
    logits = model.encode(x)
    kl = model.latent.kl(logits, model.prior_logits)
    surrogate, recon = estimator(logits, tau, lambda z: recon_nll(model.decode(z), x))
    loss = surrogate.mean() + kl.mean()
    recon, kl = recon.mean(), kl.detach().mean()
    return loss, torch.stack([recon + kl, recon, kl])


@torch.no_grad()
def log_weights(
    model: VAE, x: torch.Tensor, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """log p(x, z_i) - log q(z_i | x) for num_samples exact samples z_i per image: (num_samples, B)."""
    logits = model.encode(x)
    rep = logits.expand(num_samples, *logits.shape).reshape(-1, *logits.shape[1:])
    z = model.latent.sample(rep, generator)
    prior = model.prior_logits.expand_as(rep)
    pixel_logits = model.decode(z).view(num_samples, *x.shape)
    log_px_z = -recon_nll(pixel_logits, x.expand_as(pixel_logits)).view(-1)  # a view of x, no copies
    log_w = log_px_z + model.latent.log_prob(z, prior) - model.latent.log_prob(z, rep)
    return log_w.view(num_samples, x.shape[0])


@torch.no_grad()
def negative_elbo(
    model: VAE, images: torch.Tensor, targets: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean single-sample negative ELBO with exact (one-hot) samples and the analytic KL: a bound.

    Returns a device scalar so that callers decide when to synchronise.
    """
    total = torch.zeros((), device=images.device)
    for i in range(0, len(images), batch_size):
        x = targets(images[i : i + batch_size])
        logits = model.encode(x)
        z = model.latent.sample(logits, generator)
        nelbo = recon_nll(model.decode(z), x) + model.latent.kl(logits, model.prior_logits)
        total += nelbo.sum()
    return total / len(images)


@torch.no_grad()
def multi_sample_bound(
    model: VAE, images: torch.Tensor, targets: Callable[[torch.Tensor], torch.Tensor],
    num_samples: int, max_rows: int, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean of -log (1/m) sum_i p(x, z_i) / q(z_i | x) over images, m = num_samples (Burda et al. 2016).

    At most `max_rows` (image, sample) pairs go through the decoder at once; samples of one image
    are split over several passes when m alone exceeds it, combined with a running logsumexp.
    """
    samples_per_pass = min(num_samples, max_rows)
    images_per_pass = max(1, max_rows // samples_per_pass)
    total = torch.zeros((), device=images.device)
    for i in range(0, len(images), images_per_pass):
        x = targets(images[i : i + images_per_pass])
        log_sum = torch.full((x.shape[0],), -math.inf, device=x.device)
        for done in range(0, num_samples, samples_per_pass):
            m = min(samples_per_pass, num_samples - done)
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_weights(model, x, m, generator), dim=0))
        total -= (log_sum - math.log(num_samples)).sum()
    return total / len(images)
