"""The `model` group's schema: the latent units (type, size, prior) and the dense network around
them, which every task builds its stochastic layers and networks from (gvae/tasks/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from gvae.errors import require
from gvae.latents import Bernoulli, Categorical, Latent
from gvae.nets import Activation, Net


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
