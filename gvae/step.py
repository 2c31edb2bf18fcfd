"""The training step: targets, loss, backward and update, with nothing read back to the host.

Modes (`train.compile`):
- `eager`: plain PyTorch kernels.
- `compile`: the loss and its backward compiled by torch.compile (elementwise work fused).
- `graph` (CUDA): the whole step (sampling, forward, backward, optimizer update) captured once
  in a CUDA graph and replayed, so one launch replaces a few hundred; the launches, not the
  arithmetic, bound this small model.
- `compile_graph` (CUDA): the compiled loss inside the captured step.
- `auto`: `graph` on CUDA (no compilation wait at start-up); `eager` on the CPU, where
  compilation measured a few percent faster per step but costs seconds to start.
Whatever the mode, the step returns [loss, recon, kl] as a device tensor, so that the loop
can accumulate it without a synchronisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import hydra
import torch
from omegaconf import DictConfig

from gvae.config import Precision, resolve_device
from gvae.data import BatchSampler, Splits, load_splits
from gvae.errors import ConfigError
from gvae.estimators import Estimator, build_estimator
from gvae.model import VAE
from gvae.objective import training_loss
from gvae.schedules import temperature

MODES = ("auto", "eager", "compile", "graph", "compile_graph")
CUDA_ONLY_MODES = ("graph", "compile_graph")
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_mode(mode: str, device: torch.device) -> str:
    """The concrete mode for `auto` on this device."""
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode in CUDA_ONLY_MODES and device.type != "cuda":
        raise ConfigError(
            f"train.compile={mode!r} is not allowed on {device}: CUDA graphs need a CUDA device"
        )
    return mode


def optimizer_kwargs(optimizer_cls: type, mode: str) -> dict:
    """Fused kernels: one pass over all parameters (on this 2-core CPU Adam's fused step measured
    about 4x faster than its foreach step). A captured step needs the step count on the device."""
    kwargs = {"fused": True}
    if mode in CUDA_ONLY_MODES and "capturable" in inspect.signature(optimizer_cls).parameters:
        kwargs["capturable"] = True
    return kwargs


def make_train_step(
    model: VAE, estimator: Estimator, optimizer: torch.optim.Optimizer, splits: Splits,
    precision: Precision, mode: str, batch_size: int,
) -> StepFn:
    """Return step(images_uint8, tau) -> [loss, recon, kl] that updates the model once."""
    device_type = splits.train.device.type
    bf16 = Precision(precision) is Precision.bf16

    def loss_and_parts(images: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = splits.targets(images)
        # No autocast weight cache: a captured graph must not hold on to casts made outside it.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            return training_loss(model, estimator, x, tau)

    if mode in ("compile", "compile_graph"):
        loss_and_parts = torch.compile(loss_and_parts)

    def step(images: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        loss, parts = loss_and_parts(images, tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return parts

    if mode in CUDA_ONLY_MODES:
        return capture_step(step, [model, estimator], optimizer, splits.train[:batch_size])
    return step


def capture_step(
    step: StepFn, modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer,
    example_images: torch.Tensor, warmup: int = 3,
) -> StepFn:
    """Capture `step` in a CUDA graph; the returned function copies its inputs in and replays.

    Capture needs a few warm-up steps (allocations, compilation, lazily created optimizer
    state). They would train the model, so every tensor a step writes is put back afterwards:
    the first replay starts from exactly the state and random stream the caller handed in.
    """
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    saved = [t.detach().clone() for t in tensors]
    saved_state = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                   for p, st in optimizer.state.items()}  # non-empty when resuming
    rng = torch.cuda.get_rng_state()
    static_images = example_images.clone()
    static_tau = torch.ones((), device=example_images.device)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(static_images, static_tau)
    torch.cuda.current_stream().wait_stream(side)

    with torch.no_grad():
        for t, s in zip(tensors, saved, strict=True):
            t.copy_(s)
        for p, state in optimizer.state.items():  # fresh state is created by the warm-up: zero it
            for k, v in state.items():
                if torch.is_tensor(v):
                    v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()
    torch.cuda.set_rng_state(rng)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_parts = step(static_images, static_tau)

    def replay(images: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        static_images.copy_(images)
        static_tau.copy_(tau)
        graph.replay()
        # A copy: the next replay overwrites static_parts, and a caller may keep what it got.
        return static_parts.clone()

    return replay


@dataclass
class Training:
    """Everything a training loop needs, built from the config."""

    device: torch.device
    splits: Splits
    sampler: BatchSampler
    model: VAE
    estimator: Estimator
    optimizer: torch.optim.Optimizer
    mode: str
    step: StepFn
    tau: torch.Tensor  # a device tensor, so a compiled step never recompiles when tau changes


def build_training(cfg: DictConfig, checkpoint: dict | None = None) -> Training:
    """Seed, load the data onto the device, build the model, estimator, optimizer and step, and
    restore `checkpoint` (before the step is made: a captured graph keeps its tensors' addresses)."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    torch.manual_seed(cfg.seed)
    splits = load_splits(cfg.data, device)
    sampler = BatchSampler(splits.train, cfg.train.batch_size, seed=cfg.seed)
    model = VAE(cfg.model).to(device)
    estimator = build_estimator(cfg.estimator, model.latent).to(device)
    params = [*model.parameters(), *estimator.parameters()]
    mode = resolve_mode(cfg.train.compile, device)
    optimizer_cls = hydra.utils.get_class(cfg.optim._target_)
    optimizer = hydra.utils.instantiate(cfg.optim)(params, **optimizer_kwargs(optimizer_cls, mode))
    step_number = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        estimator.load_state_dict(checkpoint["estimator"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        sampler.load_state_dict(checkpoint["sampler"])
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in checkpoint["rng"]:  # a CPU checkpoint has none
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        step_number = checkpoint["step"]
    step = make_train_step(model, estimator, optimizer, splits, cfg.train.precision, mode,
                           cfg.train.batch_size)
    tau = torch.tensor(temperature(cfg.schedule, step_number), device=device)
    return Training(device, splits, sampler, model, estimator, optimizer, mode, step, tau)
