"""The training step: targets, loss, backward and update, with nothing read back to the host.

Modes (`train.compile`):
- `eager`: plain PyTorch kernels.
- `compile`: the loss and its backward compiled by torch.compile (elementwise work fused).
- `graph` (CUDA): the whole step (sampling, forward, backward, optimizer update) captured once
  in a CUDA graph and replayed, so one launch replaces a few hundred; the launches, not the
  arithmetic, bound this small model.
- `compile_graph` (CUDA): the compiled loss inside the captured step.
- `auto`: `graph` on CUDA (no compilation wait at start-up); `eager` on the CPU, where
  compilation is a few percent faster per step but costs seconds to start.
Whatever the mode, the step returns a TrainStats of device tensors, so that the loop can
accumulate it without a synchronisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from gvae.config import Precision, StepMode
from gvae.data import Splits
from gvae.errors import ConfigError
from gvae.estimators import Estimator
from gvae.model import VAE
from gvae.objective import TrainStats, training_loss
from gvae.rng import CounterRNG

CUDA_ONLY_MODES = (StepMode.graph, StepMode.compile_graph)
StepFn = Callable[[torch.Tensor, torch.Tensor], TrainStats]


def resolve_mode(mode: StepMode | str, device: torch.device) -> StepMode:
    """The concrete mode for `auto` on this device."""
    mode = StepMode(mode)
    if mode is StepMode.auto:
        return StepMode.graph if device.type == "cuda" else StepMode.eager
    if mode in CUDA_ONLY_MODES and device.type != "cuda":
        raise ConfigError(
            f"train.compile={mode.value!r} is not allowed on {device}: CUDA graphs need a CUDA device"
        )
    return mode


def optimizer_kwargs(optimizer_cls: type, mode: StepMode) -> dict:
    """Fused kernels: one pass over all parameters (the README's performance section measures
    Adam's fused update against its foreach one). A captured step needs the step count on the device."""
    kwargs = {"fused": True}
    if mode in CUDA_ONLY_MODES and "capturable" in inspect.signature(optimizer_cls).parameters:
        kwargs["capturable"] = True
    return kwargs


def make_train_step(
    model: VAE, estimator: Estimator, optimizer: torch.optim.Optimizer, splits: Splits,
    precision: Precision, mode: StepMode, batch_size: int, rng: CounterRNG,
    example_images: torch.Tensor | None = None,
) -> StepFn:
    """Return step(images_uint8, tau) -> TrainStats that updates the model once, drawing its noise
    from `rng` (which the step advances)."""
    device_type = splits.train.device.type
    bf16 = Precision(precision) is Precision.bf16

    def loss_and_stats(images: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, TrainStats]:
        x = splits.targets(images)
        # No autocast weight cache: a captured graph must not hold on to casts made outside it.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            return training_loss(model, estimator, x, tau)

    if mode in (StepMode.compile, StepMode.compile_graph):
        loss_and_stats = torch.compile(loss_and_stats)

    def train_step(images: torch.Tensor, tau: torch.Tensor) -> TrainStats:
        rng.start_step()
        loss, stats = loss_and_stats(images, tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rng.advance()
        return stats

    if mode in CUDA_ONLY_MODES:
        example = splits.train[:batch_size] if example_images is None else example_images
        return capture_step(train_step, [model, estimator], optimizer, example, rng)
    return train_step


def capture_step(
    train_step: StepFn, modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer,
    example_images: torch.Tensor, rng: CounterRNG, warmup: int = 3,
) -> StepFn:
    """Capture `train_step` in a CUDA graph; the returned function copies its inputs in and replays.

    Capture needs a few warm-up steps (allocations, compilation, lazily created optimizer
    state). They would train the model, so every tensor a step writes is put back afterwards:
    the first replay starts from exactly the state and random stream the caller handed in.
    """
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())] + [rng.step]
    saved = [t.detach().clone() for t in tensors]
    saved_state = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                   for p, st in optimizer.state.items()}  # non-empty when resuming
    cuda_rng = torch.cuda.get_rng_state()
    static_images = example_images.clone()
    static_tau = torch.ones((), device=example_images.device)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            train_step(static_images, static_tau)
    torch.cuda.current_stream().wait_stream(side)

    with torch.no_grad():
        for t, s in zip(tensors, saved, strict=True):
            t.copy_(s)
        for p, state in optimizer.state.items():  # fresh state is created by the warm-up: zero it
            for k, v in state.items():
                if torch.is_tensor(v):
                    v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()
    torch.cuda.set_rng_state(cuda_rng)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_stats = train_step(static_images, static_tau)

    def replay(images: torch.Tensor, tau: torch.Tensor) -> TrainStats:
        static_images.copy_(images)
        static_tau.copy_(tau)
        graph.replay()
        # A copy: the next replay overwrites static_stats, and a caller may keep what it got.
        return static_stats.clone()

    return replay
