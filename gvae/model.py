"""The VAE: an MLP encoder to latent logits, a discrete latent, an MLP decoder to Bernoulli logits."""

from __future__ import annotations

import torch
from torch import nn

from gvae.config import Activation, LatentType, ModelConfig, Prior
from gvae.latents import Bernoulli, Categorical, Latent

ACTIVATIONS = {
    Activation.relu: nn.ReLU,
    Activation.elu: nn.ELU,
    Activation.tanh: nn.Tanh,
    Activation.leaky_relu: nn.LeakyReLU,
    Activation.gelu: nn.GELU,
}


def mlp(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    """Linear layers with `activation` between them and none after the last."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def make_latent(cfg: ModelConfig) -> Latent:
    if LatentType(cfg.latent) is LatentType.bernoulli:
        return Bernoulli(cfg.num_vars)
    return Categorical(cfg.num_vars, cfg.num_classes)


class VAE(nn.Module):
    """784-hidden-(latent) encoder and (latent)-reversed(hidden)-784 decoder, as in the authors' notebook.

    `hidden=[]` gives the paper's literal 784-(20x10)-784 form. The encoder's output logits have
    no activation. The prior is uniform (a fixed zero-logit buffer) or learned (a parameter).
    """

    def __init__(self, cfg: ModelConfig, num_pixels: int = 784):
        super().__init__()
        self.latent = make_latent(cfg)
        act = ACTIVATIONS[Activation(cfg.activation)]
        hidden = list(cfg.hidden)
        self.encoder = mlp([num_pixels, *hidden, self.latent.num_logits], act)
        self.decoder = mlp([self.latent.code_size, *reversed(hidden), num_pixels], act)
        prior_logits = torch.zeros(self.latent.shape)
        if Prior(cfg.prior) is Prior.learned:
            self.prior_logits = nn.Parameter(prior_logits)
        else:
            self.register_buffer("prior_logits", prior_logits)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 784) to latent logits of the latent's shape, float32."""
        return self.latent.logits(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes to Bernoulli pixel logits (B, 784)."""
        return self.decoder(self.latent.flatten(z))

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact codes from the prior."""
        logits = self.prior_logits.detach().expand(n, *self.latent.shape)
        return self.latent.sample(logits, generator)
