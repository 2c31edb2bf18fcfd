"""The VAE: an encoder to latent logits, a discrete latent, a decoder to Bernoulli pixel logits;
and the `model` group's schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from gvae.errors import require
from gvae.latents import Bernoulli, Categorical, Latent
from gvae.nets import Activation, Net, build_nets


class LatentType(str, Enum):
    categorical = "categorical"
    bernoulli = "bernoulli"


class Prior(str, Enum):
    uniform = "uniform"
    learned = "learned"


@dataclass
class ModelConfig:
    """Schema of the `model` group: the latent (type, size, prior) and the network around it."""

    latent: LatentType = LatentType.categorical
    num_vars: int = 20
    num_classes: int = 10  # categorical only
    prior: Prior = Prior.uniform
    net: Net = Net.mlp
    hidden: list[int] = field(default_factory=lambda: [512, 256])  # dense layers, encoder order
    activation: Activation = Activation.relu
    channels: list[int] = field(default_factory=lambda: [32, 64])  # net=conv: per stride-2 layer

    def check(self, key: str, image_shape: list[int]) -> None:
        require(self.num_vars >= 1, f"{key}.num_vars", self.num_vars, "must be >= 1")
        if LatentType(self.latent) is LatentType.categorical:
            require(self.num_classes >= 2, f"{key}.num_classes", self.num_classes, "must be >= 2")
        require(all(h >= 1 for h in self.hidden), f"{key}.hidden", list(self.hidden),
                "layer sizes must be >= 1")
        if Net(self.net) is Net.conv:
            scale = 2 ** len(self.channels)
            require(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), f"{key}.channels",
                    list(self.channels), "one or more channel counts, each >= 1")
            require(image_shape[1] % scale == 0 and image_shape[2] % scale == 0, f"{key}.channels",
                    list(self.channels), f"{len(self.channels)} stride-2 layers need the image's height and "
                    f"width ({image_shape[1]}x{image_shape[2]}) divisible by {scale}")


def make_latent(cfg: ModelConfig) -> Latent:
    if LatentType(cfg.latent) is LatentType.bernoulli:
        return Bernoulli(cfg.num_vars)
    return Categorical(cfg.num_vars, cfg.num_classes)


class VAE(nn.Module):
    """Encoder, latent and decoder for images of `image_shape`, as in the authors' notebook with
    the default MLP (784-512-256-(N*K) and back; `hidden=[]` gives the paper's literal 784-(20x10)
    form). The encoder's output logits have no activation. The prior is uniform (a fixed
    zero-logit buffer) or learned (a parameter)."""

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, ...] | list[int]):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.latent = make_latent(cfg)
        self.encoder, self.decoder = build_nets(
            cfg.net, self.image_shape, list(cfg.hidden), list(cfg.channels), cfg.activation,
            self.latent.num_logits, self.latent.code_size)
        prior_logits = torch.zeros(self.latent.shape)
        if Prior(cfg.prior) is Prior.learned:
            self.prior_logits = nn.Parameter(prior_logits)
        else:
            self.register_buffer("prior_logits", prior_logits)

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
