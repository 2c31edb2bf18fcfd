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
accumulate it without a synchronisation. The step reads the temperature from the engine's own
tensor, which the engine updates in place: a captured graph reads it where it lies, whatever its
shape (a scalar for one run, (S, 1, ..., 1) for a pack).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from gvae.config import Precision, StepMode
from gvae.data import Splits
from gvae.errors import ConfigError
from gvae.objective import TrainStats
from gvae.rng import CounterRNG

CUDA_ONLY_MODES = (StepMode.graph, StepMode.compile_graph)
StepFn = Callable[[torch.Tensor], TrainStats]


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
    model: torch.nn.Module, estimator: torch.nn.Module, optimizer, splits: Splits,
    precision: Precision, mode: StepMode, tau: torch.Tensor, rng: CounterRNG,
    example_images: torch.Tensor, graphs: Graphs | None = None,
) -> StepFn:
    """Return step(images_uint8) -> TrainStats that updates the model (a task, gvae/tasks/) once at
    temperature `tau` (the engine's tensor, read at every step), drawing its noise from `rng`
    (which the step advances). `example_images` has the shape of every step's images; `graphs`
    captures the step in the graph modes (default: CUDA's)."""
    device_type = example_images.device.type
    bf16 = Precision(precision) is Precision.bf16

    def loss_and_stats(images: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, TrainStats]:
        x = splits.targets(images)
        # No autocast weight cache: a captured graph must not hold on to casts made outside it.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            return model.training_loss(estimator, x, tau)

    # An estimator that differentiates twice (a learned control variate) runs eagerly: torch.compile
    # cannot (the graph modes still capture the eager step).
    if mode in (StepMode.compile, StepMode.compile_graph) and all(
            getattr(m, "compilable", True) for m in estimator.modules()):
        loss_and_stats = torch.compile(loss_and_stats)

    def train_step(images: torch.Tensor) -> TrainStats:
        rng.start_step()
        loss, stats = loss_and_stats(images, tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rng.advance()
        return stats

    if mode in CUDA_ONLY_MODES:
        return capture_step(train_step, [model, estimator], optimizer, example_images, rng,
                            graphs or CudaGraphs())
    return train_step


class Graphs:
    """What capture_step needs from a device: a stream for the warm-up, the random state, and a graph
    that captures a function once and replays it. CudaGraphs is CUDA's; the tests have a CPU stand-in
    with the same static-buffer discipline (tests/graph_standin.py)."""

    def warmup_stream(self):
        raise NotImplementedError

    def get_rng_state(self) -> torch.Tensor:
        raise NotImplementedError

    def set_rng_state(self, state: torch.Tensor) -> None:
        raise NotImplementedError

    def capture(self, fn: Callable[[], TrainStats]) -> TrainStats:
        """Capture fn (run once); return its outputs, which every replay overwrites in place."""
        raise NotImplementedError

    def replay(self) -> None:
        raise NotImplementedError


class CudaGraphs(Graphs):
    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    @contextmanager
    def warmup_stream(self) -> Iterator[None]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def get_rng_state(self):
        return torch.cuda.get_rng_state()

    def set_rng_state(self, state):
        torch.cuda.set_rng_state(state)

    def capture(self, fn):
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self):
        self.graph.replay()


def capture_step(
    train_step: StepFn, modules: list[torch.nn.Module], optimizer, example_images: torch.Tensor,
    rng: CounterRNG, graphs: Graphs, warmup: int = 3,
) -> StepFn:
    """Capture `train_step` in a graph; the returned function copies its images in and replays.

    Capture needs a few warm-up steps (allocations, compilation, lazily created optimizer
    state). They would train the model, so every tensor a step writes is put back afterwards:
    the first replay starts from exactly the state and random stream the caller handed in.
    """
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())] + [rng.step]
    saved = [t.detach().clone() for t in tensors]
    saved_state = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                   for p, st in optimizer.state.items()}  # non-empty when resuming
    rng_state = graphs.get_rng_state()
    static_images = example_images.clone()

    @torch.no_grad()
    def restore() -> None:
        for t, s in zip(tensors, saved, strict=True):
            t.copy_(s)
        for p, state in optimizer.state.items():  # fresh state is created by the warm-up: zero it
            for k, v in state.items():
                if torch.is_tensor(v):
                    v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()
        graphs.set_rng_state(rng_state)

    with graphs.warmup_stream():
        for _ in range(warmup):
            train_step(static_images)
    restore()
    optimizer.zero_grad(set_to_none=True)
    static_stats = graphs.capture(lambda: train_step(static_images))
    # A CUDA capture runs nothing, so this changes nothing there; a stand-in that has to run the
    # step to capture it (the tests' CPU one) is put back too.
    restore()

    def replay(images: torch.Tensor) -> TrainStats:
        static_images.copy_(images)
        graphs.replay()
        # A copy: the next replay overwrites static_stats, and a caller may keep what it got.
        return static_stats.clone()

    return replay
