"""The objective and the bounds: negative ELBO for training, exact-sample bounds for evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gvae.estimators import Estimator
from gvae.model import VAE


def recon_nll(pixel_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli negative log-likelihood summed over pixels, -log p(x | l) = sum_i softplus(l_i) - x_i l_i.

    `x` may lack leading sample dimensions of `pixel_logits` (m samples per image). Then the
    formula is written out so that x broadcasts without being copied, with x . l as one batched
    product (on this 2-core CPU: 0.21 s against 0.38 s for the broadcast binary_cross_entropy,
    for 1000 samples of 50 images); for equal shapes (training) binary_cross_entropy_with_logits
    is the fastest (0.44 ms against 0.65 ms forward and backward, batch 100).
    """
    pixel_logits = pixel_logits.float()
    if pixel_logits.shape == x.shape:
        return F.binary_cross_entropy_with_logits(pixel_logits, x, reduction="none").sum(-1)
    return F.softplus(pixel_logits).sum(-1) - torch.einsum("...p,...p->...", pixel_logits, x)


class TrainStats:
    """One step's training figures, batch means on the device (reading them syncs; adding does not):

    - `surrogate`: the loss the optimizer minimises (for a score-function estimator its value is
      not the negative ELBO; only its gradient means something),
    - `nelbo` = `recon` + `kl`: the negative ELBO at the training sample (for a relaxed estimator,
      at the relaxed sample, so not a bound).

    Kept as one tensor (the figures along its first dimension, packed runs along its second) so
    that accumulating a step's figures is one kernel, and a captured CUDA graph has one output.
    """

    NAMES = ("surrogate", "nelbo", "recon", "kl")

    def __init__(self, values: torch.Tensor):
        self.values = values

    @classmethod
    def of(cls, **figures: torch.Tensor) -> TrainStats:
        return cls(torch.stack([figures[name].detach().float() for name in cls.NAMES]))

    @classmethod
    def zeros(cls, device: torch.device, runs: int | None = None) -> TrainStats:
        return cls(torch.zeros((len(cls.NAMES),) if runs is None else (len(cls.NAMES), runs), device=device))

    def add_(self, other: TrainStats) -> TrainStats:
        self.values += other.values
        return self

    def clone(self) -> TrainStats:
        return TrainStats(self.values.clone())

    def means(self, count: int) -> dict[str, float | list[float]]:
        """The figures divided by `count`, on the host (a list per figure for packed runs): the one
        synchronisation."""
        return dict(zip(self.NAMES, (self.values / count).tolist(), strict=True))

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in TrainStats.NAMES:
            return self.values[TrainStats.NAMES.index(name)]
        raise AttributeError(name)


def training_loss(
    model: VAE, estimator: Estimator, x: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, TrainStats]:
    """The loss to minimise and the step's figures.

    Negative ELBO = E_q[-log p(x|z)] + KL(q(z|x) || p(z)) (Kingma & Welling 2014). The KL is
    analytic, so only the reconstruction term goes through the estimator. With a relaxed
    sample the reconstruction term is evaluated at the relaxation and is not a bound. Packed runs
    (every tensor with a leading run dimension) each average over their own batch, and their losses
    add: each run's parameters get its own gradient.
    """
    logits = model.encode(x)
    kl = model.latent.kl(logits, model.prior_logits)
    surrogate, recon = estimator(logits, tau, lambda z: recon_nll(model.decode(z), x))
    per_run = surrogate.mean(-1) + kl.mean(-1)
    recon, kl = recon.mean(-1), kl.detach().mean(-1)
    return per_run.sum(), TrainStats.of(surrogate=per_run, nelbo=recon + kl, recon=recon, kl=kl)


@torch.no_grad()
def log_weights(
    model: VAE, x: torch.Tensor, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """log p(x, z_i) - log q(z_i | x) for num_samples exact samples z_i per image: (num_samples, B).

    The latent's log-densities broadcast the samples against each image's logits, so log q is
    normalised once per image rather than once per sample, and x is never copied.
    """
    logits = model.encode(x)
    z = model.latent.sample(logits.expand(num_samples, *logits.shape), generator)  # (m, B, ...)
    pixel_logits = model.decode(z.reshape(-1, *logits.shape[1:])).view(num_samples, *x.shape)
    log_px_z = -recon_nll(pixel_logits, x)
    return log_px_z + model.latent.log_prob(z, model.prior_logits) - model.latent.log_prob(z, logits)


Targets = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int], object] | None  # called with the number of images just done


@torch.no_grad()
def negative_elbo(
    model: VAE, images: torch.Tensor, targets: Targets, batch_size: int,
    generator: torch.Generator | None = None, progress: Progress = None,
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
        if progress:
            progress(len(x))
    return total / len(images)


@torch.no_grad()
def relaxed_negative_elbo(
    model: VAE, images: torch.Tensor, targets: Targets, batch_size: int, tau: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean negative ELBO with the decoder fed relaxed samples at temperature tau and the analytic
    KL of the discrete q. NOT a bound: the relaxed code is not a value of the discrete latent."""
    total = torch.zeros((), device=images.device)
    for i in range(0, len(images), batch_size):
        x = targets(images[i : i + batch_size])
        logits = model.encode(x)
        y = model.latent.relax(logits + model.latent.noise(logits, generator), tau)
        total += (recon_nll(model.decode(y), x) + model.latent.kl(logits, model.prior_logits)).sum()
    return total / len(images)


@torch.no_grad()
def multi_sample_bound(
    model: VAE, images: torch.Tensor, targets: Targets, num_samples: int, max_rows: int,
    generator: torch.Generator | None = None, progress: Progress = None,
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
        if progress:
            progress(len(x))
    return total / len(images)
