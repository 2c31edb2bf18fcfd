"""The encoder and decoder networks, independent of the latent: an MLP (the authors' notebook) or
a small convolutional pair. Both take and give flat rows of pixels, so the rest of gvae never
sees the image's shape."""

from __future__ import annotations

import math
from enum import Enum

from torch import nn


class Activation(str, Enum):
    relu = "relu"
    elu = "elu"
    tanh = "tanh"
    leaky_relu = "leaky_relu"
    gelu = "gelu"


class Net(str, Enum):
    mlp = "mlp"  # dense layers only
    conv = "conv"  # stride-2 convolutions around the dense layers


ACTIVATIONS = {
    Activation.relu: nn.ReLU,
    Activation.elu: nn.ELU,
    Activation.tanh: nn.Tanh,
    Activation.leaky_relu: nn.LeakyReLU,
    Activation.gelu: nn.GELU,
}


def mlp(sizes: list[int], activation: type[nn.Module], last_activation: bool = False) -> nn.Sequential:
    """Linear layers with `activation` between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or last_activation:
            layers.append(activation())
    return nn.Sequential(*layers)


def conv_encoder(image_shape: tuple[int, ...], channels: list[int], hidden: list[int], num_out: int,
                 activation: type[nn.Module]) -> nn.Sequential:
    """Flat pixels -> (C, H, W) -> stride-2 4x4 convolutions (each halves H and W) -> dense layers."""
    c, h, w = image_shape
    layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))]
    for c_in, c_out in zip([c, *channels[:-1]], channels, strict=True):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation()]
    scale = 2 ** len(channels)
    layers += [nn.Flatten(), mlp([channels[-1] * (h // scale) * (w // scale), *hidden, num_out], activation)]
    return nn.Sequential(*layers)


def conv_decoder(image_shape: tuple[int, ...], channels: list[int], hidden: list[int], num_in: int,
                 activation: type[nn.Module]) -> nn.Sequential:
    """The mirror of conv_encoder: dense layers -> (C', H/2^L, W/2^L) -> stride-2 transposed
    convolutions -> flat pixel logits."""
    c, h, w = image_shape
    scale = 2 ** len(channels)
    first = (channels[-1], h // scale, w // scale)
    dense = mlp([num_in, *reversed(hidden), math.prod(first)], activation, last_activation=True)
    layers: list[nn.Module] = [dense, nn.Unflatten(1, first)]
    outs = [*reversed(channels[:-1]), c]
    for i, (c_in, c_out) in enumerate(zip(reversed(channels), outs, strict=True)):
        layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
        if i < len(outs) - 1:
            layers.append(activation())
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def build_nets(net: Net, image_shape: tuple[int, ...], hidden: list[int], channels: list[int],
               activation: Activation, num_logits: int, code_size: int) -> tuple[nn.Module, nn.Module]:
    """(encoder: pixels -> num_logits, decoder: code_size -> pixel logits)."""
    act = ACTIVATIONS[Activation(activation)]
    if Net(net) is Net.conv:
        return (conv_encoder(image_shape, channels, hidden, num_logits, act),
                conv_decoder(image_shape, channels, hidden, code_size, act))
    pixels = math.prod(image_shape)
    return mlp([pixels, *hidden, num_logits], act), mlp([code_size, *reversed(hidden), pixels], act)
