"""The training step: targets, loss, backward and update, with nothing read back to the host.

Modes (train.compile): `eager`; `compile`, the loss and its backward compiled by torch.compile.
`auto` picks per device. Whatever the mode, the step returns [loss, recon, kl] as a device
tensor, so that the loop can accumulate it without a synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gvae.config import Precision
from gvae.data import Splits
from gvae.estimators import Estimator
from gvae.model import VAE
from gvae.objective import training_loss

MODES = ("auto", "eager", "compile")
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_mode(mode: str, device: torch.device) -> str:
    """`auto`: compile on CUDA; eager on the CPU, where compilation does not pay for this model."""
    if mode == "auto":
        return "compile" if device.type == "cuda" else "eager"
    return mode


def make_optimizer_kwargs(device: torch.device) -> dict:
    """Fused (CUDA) or foreach (CPU) optimizer kernels: one launch for all parameters."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def make_train_step(
    model: VAE, estimator: Estimator, optimizer: torch.optim.Optimizer, splits: Splits,
    precision: Precision, mode: str,
) -> StepFn:
    """Return step(images_uint8, tau) -> [loss, recon, kl] that updates the model once."""
    device_type = splits.train.device.type
    bf16 = Precision(precision) is Precision.bf16

    def loss_and_parts(images: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = splits.targets(images)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            return training_loss(model, estimator, x, tau)

    if mode == "compile":
        loss_and_parts = torch.compile(loss_and_parts)

    def step(images: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        loss, parts = loss_and_parts(images, tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return parts

    return step
