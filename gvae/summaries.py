"""What a run shows beyond numbers: image grids (TensorBoard and gvae-sample), the chart layout and
the hparams record."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from gvae.config import container, flatten
from gvae.model import VAE


def _grid(images: torch.Tensor, shape: tuple[int, ...], nrow: int) -> torch.Tensor:
    """Rows of pixels as a grid of images of `shape`, nrow per row, on grey padding."""
    return make_grid(images.float().view(-1, *shape).cpu(), nrow=nrow, pad_value=0.5)


def _pictures(pixel_logits: torch.Tensor, binary: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Bernoulli means, or binary images drawn from them."""
    means = torch.sigmoid(pixel_logits)
    return torch.bernoulli(means, generator=generator) if binary else means


@torch.no_grad()
def prior_grid(model: VAE, n: int, generator: torch.Generator | None, binary: bool = False,
               nrow: int = 8) -> torch.Tensor:
    """n images decoded from codes drawn from the prior, nrow per row."""
    pictures = _pictures(model.decode(model.prior_sample(n, generator)), binary, generator)
    return _grid(pictures, model.image_shape, nrow)


@torch.no_grad()
def reconstruction_grid(model: VAE, x: torch.Tensor, generator: torch.Generator | None, binary: bool = False,
                        nrow: int = 8) -> torch.Tensor:
    """Rows of nrow inputs `x` (targets in [0, 1]), each followed by a row of their reconstructions
    from one exact code sample; len(x) is rounded down to a multiple of nrow."""
    x = x[: len(x) // nrow * nrow]
    recon = _pictures(model.decode(model.latent.sample(model.encode(x), generator)), binary, generator)
    rows = len(x) // nrow
    pairs = torch.stack([x.view(rows, nrow, -1), recon.view(rows, nrow, -1)], dim=1).view(2 * len(x), -1)
    return _grid(pairs, model.image_shape, nrow)


@torch.no_grad()
def traversal_grid(model: VAE, x: torch.Tensor, max_vars: int = 16, binary: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Row v: the most likely code of the one image `x` (1, pixels) with variable v set to each of
    its values in turn, for the first max_vars variables."""
    latent = model.latent
    code = latent.harden(model.encode(x[:1]))
    rows = min(latent.num_vars, max_vars)
    codes = torch.cat([latent.one_value(code, v, k) for v in range(rows) for k in range(latent.num_values)])
    return _grid(_pictures(model.decode(codes), binary, generator), model.image_shape, latent.num_values)


def log_images(
    writer: SummaryWriter, model: VAE, x: torch.Tensor, step: int, generator: torch.Generator
) -> None:
    """Prior samples (8x8), inputs above reconstructions, and a latent traversal, as image grids.

    `x` holds at least 32 evaluation targets in [0, 1].
    """
    writer.add_image("samples/prior", prior_grid(model, 64, generator), step)
    writer.add_image("samples/reconstruction", reconstruction_grid(model, x[:32], generator), step)
    writer.add_image("samples/traversal", traversal_grid(model, x[:1]), step)


def log_layout(writer: SummaryWriter) -> None:
    """TensorBoard's Custom Scalars tab: the training objective and the validation negative ELBO on
    one chart, the temperature beside it, then the parts of the objective and the speed."""
    writer.add_custom_scalars({
        "gvae": {
            "negative ELBO: training (relaxed estimators: not a bound) and validation":
                ["Multiline", ["train/loss", "val/nelbo"]],
            "temperature": ["Multiline", ["train/tau"]],
        },
        "details": {
            "reconstruction and KL": ["Multiline", ["train/recon", "train/kl"]],
            "speed (steps/s)": ["Multiline", ["perf/steps_per_sec"]],
            "learning rate": ["Multiline", ["train/lr"]],
        },
    })


# The hparams view's columns when a run has no command-line settings to show.
DEFAULT_HPARAMS = ("estimator.name", "model.latent", "optim.lr", "seed")


def _scalar(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def hparams(cfg: DictConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """The values a reader compares runs by: the estimator, then those set on the command line
    (`settings`; in a multirun, the swept ones among them), or else DEFAULT_HPARAMS."""
    flat = flatten(container(cfg))
    chosen = settings or {k: flat[k] for k in DEFAULT_HPARAMS}
    return {k: _scalar(v) for k, v in {"estimator.name": flat["estimator.name"], **chosen}.items()}


def log_config_and_hparams(writer: SummaryWriter, cfg: DictConfig, metrics: dict[str, float],
                           settings: dict[str, Any]) -> None:
    """Resolved config as text and the hparams record, kept in the run's own folder."""
    yaml = OmegaConf.to_yaml(cfg, resolve=True)
    writer.add_text("config", "    " + yaml.replace("\n", "\n    "))
    writer.add_hparams(hparams(cfg, settings), {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")
