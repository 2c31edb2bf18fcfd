"""Image grids of pixel rows, for TensorBoard and gvae-sample."""

from __future__ import annotations

import torch


def grid(images: torch.Tensor, shape: tuple[int, ...], nrow: int) -> torch.Tensor:
    """Rows of pixels as a grid of images of `shape`, nrow per row, on grey padding."""
    # Imported here: torchvision brings its models and ops, seconds at start-up that only pictures need.
    from torchvision.utils import make_grid

    return make_grid(images.float().view(-1, *shape).cpu(), nrow=nrow, pad_value=0.5)


def bernoulli_pictures(pixel_logits: torch.Tensor, binary: bool,
                       generator: torch.Generator | None) -> torch.Tensor:
    """Bernoulli means, or binary images drawn from them."""
    means = torch.sigmoid(pixel_logits)
    return torch.bernoulli(means, generator=generator) if binary else means
