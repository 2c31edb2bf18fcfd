"""What a run shows in TensorBoard beyond its scalars: the chart layout, the config as text and the
hparams record (each task draws its own image grids, gvae/tasks/)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from gvae.config import container, flatten


def log_layout(writer: SummaryWriter, train_tags: dict[str, str]) -> None:
    """TensorBoard's Custom Scalars tab: the training objective and the validation negative ELBO on
    one chart, the temperature beside it, then the parts of the objective (the task's training
    figures `train_tags`: the VAE's reconstruction and KL), the speed and the learning rate."""
    parts = [tag for name, tag in train_tags.items() if name in ("recon", "kl")]
    details = {"reconstruction and KL": ["Multiline", parts]} if parts else {}
    writer.add_custom_scalars({
        "gvae": {
            "negative ELBO: training (relaxed estimators: not a bound) and validation":
                ["Multiline", ["train/loss", "val/nelbo"]],
            "temperature": ["Multiline", ["train/tau"]],
        },
        "details": {
            **details,
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
