"""`task=vae` (the default): the paper's VAE, an encoder to latent logits, one discrete latent, a
decoder to Bernoulli pixel logits, trained on the single-sample ELBO with the analytic KL, or on the
K-sample importance-weighted bound (task.objective=iwae)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from gvae.estimators import build_estimator
from gvae.model import LatentType, ModelConfig, Prior, make_latent
from gvae.nets import build_nets
from gvae.objective import TrainStats, recon_nll, repeat_rows
from gvae.pictures import bernoulli_pictures, grid
from gvae.tasks.base import Figure, Objective, Task, TaskConfig, register_task

if TYPE_CHECKING:  # TensorBoard is imported by the trainer, which writes the summaries
    from torch.utils.tensorboard import SummaryWriter


@dataclass
class VAEConfig(TaskConfig):
    """`task=vae`: the model group's latent between the model group's encoder and decoder."""

    name: str = "vae"


def latent_label(model: ModelConfig) -> str:
    """"categorical (20x10)" or "Bernoulli (200)"."""
    if LatentType(model.latent) is LatentType.bernoulli:
        return f"Bernoulli ({model.num_vars})"
    return f"categorical ({model.num_vars}x{model.num_classes})"


@register_task(VAEConfig)
class VAE(Task):
    """Encoder, latent and decoder for images of `image_shape`, as in the authors' notebook with
    the default MLP (784-512-256-(N*K) and back; `hidden=[]` gives the paper's literal 784-(20x10)
    form). The encoder's output logits have no activation. The prior is uniform (a fixed
    zero-logit buffer) or learned (a parameter)."""

    FIGURES = (
        Figure("nelbo", "single-sample negative ELBO, exact samples and the analytic KL", bound=True),
        Figure("bound", "-log (1/m) sum_i p(x, z_i) / q(z_i | x) (Burda et al. 2016)", bound=True),
        Figure("relaxed_nelbo", "negative ELBO with relaxed samples at the temperature", bound=False),
    )
    # train/loss is the negative ELBO at the training sample (its name since the start).
    TRAIN_TAGS = {"nelbo": "train/loss", "surrogate": "train/surrogate", "recon": "train/recon",
                  "kl": "train/kl"}
    picture_files = {"prior": "prior.png", "reconstructions": "reconstructions.png",
                     "traversal": "traversal.png"}
    exact_microscope = True

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, ...] | list[int],
                 task: VAEConfig | None = None):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent = make_latent(cfg)
        self.encoder, self.decoder = build_nets(
            cfg.net, self.image_shape, list(cfg.hidden), list(cfg.channels), cfg.activation,
            self.latent.num_logits, self.latent.code_size)
        self.set_objective(task)
        prior_logits = torch.zeros(self.latent.shape)
        if Prior(cfg.prior) is Prior.learned:
            self.prior_logits = nn.Parameter(prior_logits)
        else:
            self.register_buffer("prior_logits", prior_logits)

    @property
    def latents(self):
        return [self.latent]

    @staticmethod
    def label(model: ModelConfig, task: VAEConfig) -> str:
        return latent_label(model)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, pixels) to latent logits of the latent's shape, float32."""
        return self.latent.logits(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes to Bernoulli pixel logits (B, pixels)."""
        return self.decoder(self.latent.flatten(z))

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact codes from the prior."""
        logits = self.prior_logits.detach().expand(n, *self.latent.shape)
        return self.latent.sample(logits, generator)

    def build_estimator(self, cfg, runs=None):
        return build_estimator(cfg, self.latent, runs)

    # -------------------------------------------------------------------------
    # objective and figures

    def training_loss(self, estimator, x, tau):
        """Negative ELBO = E_q[-log p(x|z)] + KL(q(z|x) || p(z)) (Kingma & Welling 2014). The KL is
        analytic, so only the reconstruction term goes through the estimator. With a relaxed
        sample the reconstruction term is evaluated at the relaxation and is not a bound. Packed
        runs (every tensor with a leading run dimension) each average over their own batch, and
        their losses add: each run's parameters get its own gradient. objective=iwae: iwae_loss."""
        logits = self.encode(x)
        if self.objective is Objective.iwae:
            return self.iwae_loss(estimator, logits, x, tau)
        kl = self.latent.kl(logits, self.prior_logits)
        surrogate, recon = estimator(logits, tau, lambda z: recon_nll(self.decode(z), x))
        per_run = surrogate.mean(-1) + kl.mean(-1)
        recon, kl = recon.mean(-1), kl.detach().mean(-1)
        return per_run.sum(), TrainStats.of(surrogate=per_run, nelbo=recon + kl, recon=recon, kl=kl)

    def iwae_loss(self, estimator, logits, x, tau):
        """The K-sample bound -log (1/K) sum_k p(x, z_k) / q(z_k | x) (Burda et al. 2016), through the
        estimator's multi_sample: K codes per example, each example's logits and image repeated K
        times in the batch. The log-weight is a function of the code whose terms log p(z) and
        log q(z | x) are linear in it (z . log pi; for a binary unit z l - softplus(l)), so a relaxed
        code goes through the same expression as through the decoder (at a relaxed code it is not a
        log-weight and the figure is not a bound); log q's gradient in the logits is taken directly
        too. The training figures also give the negative ELBO at the same samples (recon: their mean
        reconstruction term; kl: the analytic KL), comparable with an elbo run's."""
        k, batch_dim = self.samples, logits.dim() - len(self.latent.shape) - 1
        rows, images = repeat_rows(logits, k, batch_dim), repeat_rows(x, k, batch_dim)
        recon = torch.zeros((), device=x.device)

        def neg_log_weight(z: torch.Tensor) -> torch.Tensor:
            nonlocal recon
            nll = recon_nll(self.decode(z), images)
            recon = nll.detach()
            return nll - self.latent.log_prob(z, self.prior_logits) + self.latent.log_prob(z, rows)

        surrogate, bound = estimator.multi_sample(rows, tau, neg_log_weight, k)
        per_run = surrogate.mean(-1)
        recon, kl = recon.mean(-1), self.latent.kl(logits, self.prior_logits).detach().mean(-1)
        return per_run.sum(), TrainStats.of(surrogate=per_run, nelbo=recon + kl, recon=recon, kl=kl,
                                            bound=bound.mean(-1))

    def nelbo(self, x, generator):
        logits = self.encode(x)
        z = self.latent.sample(logits, generator)
        return recon_nll(self.decode(z), x) + self.latent.kl(logits, self.prior_logits)

    def log_weights(self, x, num_samples, generator):
        """log p(x, z_i) - log q(z_i | x). The latent's log-densities broadcast the samples against
        each image's logits, so log q is normalised once per image rather than once per sample,
        and x is never copied."""
        logits = self.encode(x)
        z = self.latent.sample(logits.expand(num_samples, *logits.shape), generator)  # (m, B, ...)
        pixel_logits = self.decode(z.reshape(-1, *logits.shape[1:])).view(num_samples, *x.shape)
        log_px_z = -recon_nll(pixel_logits, x)
        return log_px_z + self.latent.log_prob(z, self.prior_logits) - self.latent.log_prob(z, logits)

    def relaxed_nelbo(self, x, tau, generator):
        """The decoder fed relaxed samples, with the analytic KL of the discrete q. NOT a bound: the
        relaxed code is not a value of the discrete latent."""
        logits = self.encode(x)
        y = self.latent.relax(logits + self.latent.noise(logits, generator), tau)
        return recon_nll(self.decode(y), x) + self.latent.kl(logits, self.prior_logits)

    # -------------------------------------------------------------------------
    # pictures

    @torch.no_grad()
    def prior_grid(self, n: int, generator: torch.Generator | None, binary: bool = False,
                   nrow: int = 8) -> torch.Tensor:
        """n images decoded from codes drawn from the prior, nrow per row."""
        pictures = bernoulli_pictures(self.decode(self.prior_sample(n, generator)), binary, generator)
        return grid(pictures, self.image_shape, nrow)

    @torch.no_grad()
    def reconstruction_grid(self, x: torch.Tensor, generator: torch.Generator | None, binary: bool = False,
                            nrow: int = 8) -> torch.Tensor:
        """Rows of nrow inputs `x` (targets in [0, 1]), each followed by a row of their
        reconstructions from one exact code sample; len(x) is rounded down to a multiple of nrow."""
        x = x[: len(x) // nrow * nrow]
        codes = self.latent.sample(self.encode(x), generator)
        recon = bernoulli_pictures(self.decode(codes), binary, generator)
        rows = len(x) // nrow
        pairs = torch.stack([x.view(rows, nrow, -1), recon.view(rows, nrow, -1)], dim=1).view(2 * len(x), -1)
        return grid(pairs, self.image_shape, nrow)

    @torch.no_grad()
    def traversal_grid(self, x: torch.Tensor, max_vars: int = 16, binary: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Row v: the most likely code of the one image `x` (1, pixels) with variable v set to each
        of its values in turn, for the first max_vars variables."""
        latent = self.latent
        code = latent.harden(self.encode(x[:1]))
        rows = min(latent.num_vars, max_vars)
        codes = torch.cat([latent.one_value(code, v, k)
                           for v in range(rows) for k in range(latent.num_values)])
        return grid(bernoulli_pictures(self.decode(codes), binary, generator), self.image_shape,
                    latent.num_values)

    def log_images(self, writer: SummaryWriter, x: torch.Tensor, step: int,
                   generator: torch.Generator) -> None:
        """Prior samples (8x8), inputs above reconstructions, and a latent traversal."""
        writer.add_image("samples/prior", self.prior_grid(64, generator), step)
        writer.add_image("samples/reconstruction", self.reconstruction_grid(x[:32], generator), step)
        writer.add_image("samples/traversal", self.traversal_grid(x[:1]), step)

    def pictures(self, x, generator, num, binary, image, max_vars):
        nrow = max(1, math.isqrt(num))
        return {"prior": self.prior_grid(num, generator, binary, nrow),
                "reconstructions": self.reconstruction_grid(x[:num], generator, binary, nrow),
                "traversal": self.traversal_grid(x[image : image + 1], max_vars, binary, generator)}

    # -------------------------------------------------------------------------
    # the microscope: the encoder's logits

    def diag_logits(self, x):
        return self.encode(x)

    def diag_objective(self, estimator, logits, x, tau):
        surrogate, _ = estimator(logits, tau, lambda z: recon_nll(self.decode(z), x))
        return surrogate + self.analytic(logits)

    def expected_loss(self, x, z):
        return recon_nll(self.decode(z), x)

    def analytic(self, logits):
        return self.latent.kl(logits, self.prior_logits.detach())
