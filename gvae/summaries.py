"""What a run shows in TensorBoard beyond scalars: image grids and the hparams record."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from gvae.model import VAE


def _pixels(pixel_logits_or_images: torch.Tensor) -> torch.Tensor:
    return pixel_logits_or_images.float().view(-1, 1, 28, 28).cpu()


@torch.no_grad()
def log_images(
    writer: SummaryWriter, model: VAE, x: torch.Tensor, step: int, generator: torch.Generator
) -> None:
    """Prior samples (8x8), inputs beside reconstructions, and latent traversals, as image grids.

    `x` holds at least 32 evaluation targets in [0, 1].
    """
    prior = torch.sigmoid(model.decode(model.prior_sample(64, generator)))
    writer.add_image("samples/prior", make_grid(_pixels(prior), nrow=8, pad_value=0.5), step)

    inputs = x[:32]
    recon = torch.sigmoid(model.decode(model.latent.sample(model.encode(inputs), generator)))
    # Rows alternate: eight inputs, then their eight reconstructions.
    pairs = torch.stack([inputs.view(4, 8, -1), recon.view(4, 8, -1)], dim=1).view(64, -1)
    writer.add_image("samples/reconstruction", make_grid(_pixels(pairs), nrow=8, pad_value=0.5), step)

    # Row v: the first input's most likely code with variable v set to each of its values in turn.
    latent = model.latent
    code = latent.harden(model.encode(inputs[:1]))
    rows = min(latent.num_vars, 16)
    codes = torch.cat([latent.one_value(code, v, k) for v in range(rows) for k in range(latent.num_values)])
    traversal = torch.sigmoid(model.decode(codes))
    writer.add_image(
        "samples/traversal", make_grid(_pixels(traversal), nrow=latent.num_values, pad_value=0.5), step
    )


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The config as {dotted.key: scalar}, the form add_hparams accepts (lists become strings)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat


def log_config_and_hparams(writer: SummaryWriter, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Resolved config as text and the hparams record, kept in the run's own folder."""
    yaml = OmegaConf.to_yaml(cfg, resolve=True)
    writer.add_text("config", "    " + yaml.replace("\n", "\n    "))
    writer.add_hparams(flat_hparams(cfg), {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")
