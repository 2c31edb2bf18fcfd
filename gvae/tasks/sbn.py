"""`task=sbn`: structured output prediction with a sigmoid belief network (Jang, Gu & Poole 2017,
Section 4.1, after Raiko et al. 2015 and Gu et al. 2016): predict the lower half of each image from
its upper half through `task.layers` stochastic layers of the model group's latent units.

    x_upper -> h_1 ~ p(h_1 | x_upper) -> ... -> h_L ~ p(h_L | h_{L-1}) -> x_lower ~ Bernoulli(net(h_L))

The paper's networks are 392-200-200-392 (200 binary units per layer) and 392-(20x10)-(20x10)-392
(20 categorical variables of 10 classes), with linear maps between the layers: `model.hidden=[]`,
which configs/task/sbn.yaml sets (dense layers there make each conditional an MLP). There is no
inference network: the samples come from the model itself, so the training objective with m = 1
is -log p(x_lower | h), h ~ p(h | x_upper), and the m-sample figure -log (1/m) sum_i p(x_lower | h_i)
is the importance-sampled estimate of -log p(x_lower | x_upper) that the paper evaluates with
m = 1000. Both are upper bounds on -log p(x_lower | x_upper) in expectation (Jensen), so they are
reported under the VAE's names: `nelbo` (one sample) and `bound` (m samples).

Each stochastic layer has its own estimator (its own moving baselines). Layer l's estimator sees
as its loss the rest of the network from its code on, whose value is the loss at the sampled path
and whose gradient is the deeper layers' estimators': the chain rule, estimator by estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gvae.errors import require
from gvae.estimators import build_estimator
from gvae.model import ModelConfig, Prior, make_latent
from gvae.nets import ACTIVATIONS, Activation, Net, mlp
from gvae.objective import TrainStats, k_sample_bound, recon_nll, repeat_rows
from gvae.pictures import bernoulli_pictures, grid
from gvae.tasks.base import Figure, Objective, Task, TaskConfig, register_task
from gvae.tasks.vae import latent_label


@dataclass
class SBNConfig(TaskConfig):
    """`task=sbn`: the lower half of each image predicted from its upper half (the paper's
    structured output prediction)."""

    name: str = "sbn"
    layers: int = 2  # stochastic layers, each of the model group's latent units

    def check(self, key: str, model: ModelConfig, image_shape: list[int]) -> None:
        super().check(key, model, image_shape)
        require(self.layers >= 1, f"{key}.layers", self.layers, "must be >= 1")
        require(image_shape[1] % 2 == 0, "data.image_shape", list(image_shape),
                "task=sbn predicts the lower half of each image from the upper half: the height must be even")
        require(Net(model.net) is Net.mlp, "model.net", Net(model.net).value,
                "task=sbn has dense layers only (model.net=mlp)")
        require(Prior(model.prior) is Prior.uniform, "model.prior", Prior(model.prior).value,
                "task=sbn has no prior to learn: its first layer is conditioned on the upper half")


@register_task(SBNConfig)
class SBN(Task):
    """A sigmoid belief network from the upper half of an image to its lower half (module docstring)."""

    FIGURES = (
        Figure("nelbo", "-log p(x_lower | h), h one exact sample from p(h | x_upper)", bound=True),
        Figure("bound", "-log (1/m) sum_i p(x_lower | h_i), h_i ~ p(h | x_upper) (Raiko et al. 2015)",
               bound=True),
        Figure("relaxed_nelbo", "-log p(x_lower | h) with relaxed samples at the temperature", bound=False),
    )
    TRAIN_TAGS = {"nelbo": "train/loss", "surrogate": "train/surrogate"}
    picture_files = {"completions": "completions.png"}
    exact_microscope = False  # the loss given the first layer's code samples the layers after it

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, ...] | list[int], task: SBNConfig):
        super().__init__()
        self.set_objective(task)
        self.image_shape = tuple(image_shape)
        channels, height, width = self.image_shape
        self.half = (channels * (height // 2) * width, channels * (height - height // 2) * width)
        self.latents = [make_latent(cfg) for _ in range(task.layers)]
        act = ACTIVATIONS[Activation(cfg.activation)]
        ins = [self.half[0], *(latent.code_size for latent in self.latents)]
        outs = [*(latent.num_logits for latent in self.latents), self.half[1]]
        # nets[l] maps layer l's input (the upper half, or the code below) to the next logits.
        self.nets = nn.ModuleList(mlp([n_in, *cfg.hidden, n_out], act)
                                  for n_in, n_out in zip(ins, outs, strict=True))

    @staticmethod
    def label(model: ModelConfig, task: SBNConfig) -> str:
        return f"SBN {latent_label(model)}" + (f", {task.layers} layers" if task.layers != 2 else "")

    def build_estimator(self, cfg, runs=None):
        return nn.ModuleList(build_estimator(cfg, latent, runs) for latent in self.latents)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(upper half, lower half) of pixel rows (..., pixels), each flat."""
        channels, height, width = self.image_shape
        images = x.reshape(*x.shape[:-1], channels, height, width)
        return images[..., : height // 2, :].flatten(-3), images[..., height // 2 :, :].flatten(-3)

    def join(self, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        """Pixel rows from their two halves."""
        channels, height, width = self.image_shape
        top = upper.reshape(*upper.shape[:-1], channels, height // 2, width)
        bottom = lower.reshape(*lower.shape[:-1], channels, height - height // 2, width)
        return torch.cat([top, bottom], dim=-2).flatten(-3)

    def logits(self, layer: int, below: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s logits given what is below it: the upper half (layer 0) or a code."""
        flat = below if layer == 0 else self.latents[layer - 1].flatten(below)
        return self.latents[layer].logits(self.nets[layer](flat))

    def output(self, code: torch.Tensor) -> torch.Tensor:
        """The lower half's Bernoulli logits given the last layer's code."""
        return self.nets[-1](self.latents[-1].flatten(code))

    # -------------------------------------------------------------------------
    # objective and figures

    def loss_from(self, estimators: nn.ModuleList, layer: int, below: torch.Tensor, lower: torch.Tensor,
                  tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(surrogate, value) of -log p(x_lower | ...) from layer `layer` on, through its estimator."""
        return estimators[layer](self.logits(layer, below), tau, self.rest(estimators, layer + 1, lower, tau))

    def rest(self, estimators: nn.ModuleList, layer: int, lower: torch.Tensor, tau: torch.Tensor):
        """The loss as a function of the code below layer `layer`: its value is the loss at the
        sampled path, its gradient the deeper estimators' (a zero-valued surrogate correction)."""
        if layer == len(self.latents):
            return lambda code: recon_nll(self.output(code), lower)

        def loss(code: torch.Tensor) -> torch.Tensor:
            surrogate, value = self.loss_from(estimators, layer, code, lower, tau)
            return value + (surrogate - surrogate.detach())

        return loss

    def training_loss(self, estimator, x, tau):
        """-log p(x_lower | h) at one sample h ~ p(h | x_upper): the paper's objective with m = 1;
        objective=iwae: -log (1/K) sum_k p(x_lower | h_k), the paper's objective with m = K.
        Packed runs each average over their own batch, and their losses add."""
        upper, lower = self.halves(x)
        if self.objective is Objective.iwae:
            return self.iwae_loss(estimator, upper, lower, tau)
        surrogate, value = self.loss_from(estimator, 0, upper, lower, tau)
        per_run, nll = surrogate.mean(-1), value.mean(-1)
        return per_run.sum(), TrainStats.of(surrogate=per_run, nelbo=nll)

    def iwae_loss(self, estimator, upper, lower, tau):
        """The K-sample figure: each example's halves repeated K times in the batch. Reparameterised
        estimators: the paths' values, pathwise through every layer's relaxed (or straight-through)
        codes, into the bound. VIMCO: its learning signal is the whole path's (every layer's log
        probability with the same signal), so exact paths are drawn here and layer 0's estimator
        turns their log-weights and log-probabilities into its surrogate."""
        k = self.samples
        batch_dim = upper.dim() - 2
        upper, lower = repeat_rows(upper, k, batch_dim), repeat_rows(lower, k, batch_dim)
        if estimator[0].whole_path:
            below, log_q = upper, 0.0
            for layer, latent in enumerate(self.latents):
                logits = self.logits(layer, below)
                below = latent.sample(logits.detach())
                log_q = log_q + latent.log_prob(below, logits)
            nll = recon_nll(self.output(below), lower)
            surrogate, bound = estimator[0].joint_surrogate(nll, log_q, k)
        else:
            nll, _ = self.loss_from(estimator, 0, upper, lower, tau)  # a reparameterised path: the values
            surrogate = bound = k_sample_bound(nll, k)
        per_run = surrogate.mean(-1)
        return per_run.sum(), TrainStats.of(surrogate=per_run, nelbo=nll.detach().mean(-1),
                                            bound=bound.detach().mean(-1))

    def sample_path(self, upper: torch.Tensor, generator: torch.Generator | None,
                    num_samples: int | None = None, tau: float | None = None) -> torch.Tensor:
        """The last layer's code on one path down from the upper half: exact samples, or relaxed
        ones at temperature tau; num_samples of them per image (leading dimension) if given."""
        below = upper
        for layer, latent in enumerate(self.latents):
            logits = self.logits(layer, below)
            if layer == 0 and num_samples is not None:
                logits = logits.expand(num_samples, *logits.shape)
            if tau is None:
                below = latent.sample(logits, generator)
            else:
                below = latent.relax(logits + latent.noise(logits, generator), tau)
        return below

    def nelbo(self, x, generator):
        upper, lower = self.halves(x)
        return recon_nll(self.output(self.sample_path(upper, generator)), lower)

    def log_weights(self, x, num_samples, generator):
        """log p(x_lower | h_i), h_i ~ p(h | x_upper): the proposal is the model, so the weight is
        the likelihood of the lower half alone."""
        upper, lower = self.halves(x)
        return -recon_nll(self.output(self.sample_path(upper, generator, num_samples)), lower)

    def relaxed_nelbo(self, x, tau, generator):
        upper, lower = self.halves(x)
        return recon_nll(self.output(self.sample_path(upper, generator, tau=tau)), lower)

    # -------------------------------------------------------------------------
    # pictures

    @torch.no_grad()
    def completion_grid(self, x: torch.Tensor, generator: torch.Generator | None, binary: bool = False,
                        nrow: int = 8) -> torch.Tensor:
        """Rows of nrow images x, each followed by a row of their completions: the upper half kept,
        the lower half drawn from the model given it; len(x) is rounded down to a multiple of nrow."""
        x = x[: len(x) // nrow * nrow]
        upper, _ = self.halves(x)
        lower = bernoulli_pictures(self.output(self.sample_path(upper, generator)), binary, generator)
        rows = len(x) // nrow
        completed = self.join(upper, lower)
        pairs = torch.stack([x.view(rows, nrow, -1), completed.view(rows, nrow, -1)],
                            dim=1).view(2 * len(x), -1)
        return grid(pairs, self.image_shape, nrow)

    def log_images(self, writer, x, step, generator):
        """Validation images above their completions."""
        writer.add_image("samples/completion", self.completion_grid(x[:32], generator), step)

    def pictures(self, x, generator, num, binary, image, max_vars):
        return {"completions": self.completion_grid(x[:num], generator, binary, max(1, math.isqrt(num)))}

    # -------------------------------------------------------------------------
    # the microscope: the first layer's logits

    def diag_logits(self, x):
        return self.logits(0, self.halves(x)[0])

    def diag_objective(self, estimator, logits, x, tau):
        _, lower = self.halves(x)
        surrogate, _ = estimator[0](logits, tau, self.rest(estimator, 1, lower, tau))
        return surrogate

    def expected_loss(self, x, z):
        """One exact sample of the layers after the first, given its code z: unbiased, not exact."""
        _, lower = self.halves(x)
        below = z
        for layer in range(1, len(self.latents)):
            below = self.latents[layer].sample(self.logits(layer, below))
        return recon_nll(self.output(below), lower)

    def analytic(self, logits):
        return logits.new_zeros(logits.shape[: logits.dim() - len(self.latents[0].shape)])
