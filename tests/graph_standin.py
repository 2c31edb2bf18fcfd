"""A CPU stand-in for CUDA graphs, so that the tests run the capture logic of gvae/step.py here.

It keeps a CUDA graph's discipline where it can be kept on the CPU:
- the captured function reads only what it held at capture: its static input buffers (the images
  copied in before each replay, the engine's temperature tensor), the parameters, optimizer state,
  buffers and the noise counter, all updated in place;
- a replay writes its outputs into the tensors the capture returned (what the step hands out is a
  copy of them), so an output that a replay did not refresh, or a caller that kept a reference
  instead of a copy, shows up as wrong numbers;
- no host synchronisation during capture or replay (a CUDA graph cannot capture one): an .item(),
  a bool() of a tensor or a data-dependent branch fails here as it would fail there.
What it cannot show: memory reuse inside a graph, allocations made during capture that a replay
would not redo, or Python state that a real replay never updates (the step keeps none: its noise
counter is a device tensor, gvae/rng.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gvae.step import Graphs


class NoHostReads(TorchDispatchMode):
    """Fails on any operation that reads a tensor's value back to the host."""

    HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                  torch.ops.aten.is_nonzero.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.HOST_READS:
            raise AssertionError(f"host synchronisation inside a captured step: {func}")
        return func(*args, **(kwargs or {}))


class StandInGraphs(Graphs):
    """Graphs for the CPU: capture runs the function once and keeps it; replay runs it again and
    copies its outputs into the captured ones."""

    def __init__(self):
        self.fn = None
        self.outputs = None
        self.replays = 0

    def warmup_stream(self):
        return nullcontext()

    def get_rng_state(self):
        return torch.get_rng_state()

    def set_rng_state(self, state):
        torch.set_rng_state(state)

    def capture(self, fn):
        with NoHostReads():
            self.fn, self.outputs = fn, fn()
        return self.outputs

    def replay(self):
        with NoHostReads():
            fresh = self.fn()
        with torch.no_grad():
            self.outputs.values.copy_(fresh.values)  # the step's one output: its TrainStats
        self.replays += 1
