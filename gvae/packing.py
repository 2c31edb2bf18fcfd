"""Packing: S models of the same shapes stacked into one, and their optimizer's update; the math only
(gvae/engine.py decides what may share a pack and builds it).

A small model leaves a GPU idle: one step is a few hundred small kernels. Packed, S runs share every
kernel: each Linear's weights are stacked along a leading run dimension (StackedLinear, one batched
product), every other tensor of the model gets a run dimension and a batch dimension of one, so that
each tensor of a step carries the runs along its first dimension and the task's own code (gvae/tasks/)
runs unchanged. Parameters keep one model's order, so the runs' slices map one to one. An estimator
with parameters of its own (a learned control variate) makes them with the pack's shape, (S, ...).
"""

from __future__ import annotations

import copy
from enum import Enum
from typing import Any

import torch
from torch import nn


class StackedLinear(nn.Module):
    """S Linear layers as one: weights stored transposed, (S, in, out), so that inputs of shape
    (S, B, in) go through one batched product with no copy (on this 2-core CPU a transposed view
    made the batched product copy its operand every step); biases (S, 1, out)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach().T for layer in layers]).contiguous())
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]).unsqueeze(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, h, self.weight)


def stack_models(models: list[nn.Module]) -> nn.Module:
    """One module computing all of `models` (the same class and shapes) on inputs with a leading run
    dimension: a copy of the first whose Linear layers are StackedLinear and whose own tensors
    (a prior's logits) are stacked as (S, 1, ...). ValueError naming a layer that cannot be stacked
    (a convolution)."""
    packed = copy.deepcopy(models[0])
    for name, module in list(packed.named_modules()):
        for child, layer in list(module.named_children()):
            if isinstance(layer, nn.Linear):
                path = f"{name}.{child}" if name else child
                setattr(module, child, StackedLinear([m.get_submodule(path) for m in models]))
    for name, module in packed.named_modules():
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if own and not isinstance(module, StackedLinear) and module is not packed:
            raise ValueError(f"{name} ({type(module).__name__}) cannot be packed: packed runs need dense "
                             "layers (model.net=mlp)")
    for kind in ("_parameters", "_buffers"):
        for key, tensor in list(getattr(packed, kind).items()):
            stacked = torch.stack([getattr(m, key).detach() for m in models]).unsqueeze(1)
            getattr(packed, kind)[key] = (nn.Parameter(stacked) if isinstance(tensor, nn.Parameter)
                                          else stacked)
    return packed


class Layout(Enum):
    """How a stacked tensor holds the runs' copies of one model's tensor."""

    WEIGHT = "weight"  # a StackedLinear weight: (S, in, out), each run's transposed
    FREE = "free"  # any other tensor of a stacked model: (S, 1, ...)
    LEADING = "leading"  # an estimator's own parameter, made with the pack's shape: (S, ...)


def layouts(packed: nn.Module, estimator: nn.Module | None = None) -> list[Layout]:
    """Per parameter of a stacked model, then of the packed estimator, its layout: the order of
    the pack's optimizer."""
    kinds = [Layout.WEIGHT if name.endswith(".weight")
             and isinstance(packed.get_submodule(name.rpartition(".")[0]), StackedLinear) else Layout.FREE
             for name, _ in packed.named_parameters()]
    return kinds + [Layout.LEADING for _ in (estimator.parameters() if estimator is not None else ())]


def single(layout: Layout, packed: torch.Tensor, s: int) -> torch.Tensor:
    """Run s's part, in one model's layout, of a stacked parameter or of a tensor shaped like it."""
    if layout is Layout.WEIGHT:
        return packed[s].T
    return packed[s, 0] if layout is Layout.FREE else packed[s]


def stacked(layout: Layout, singles: list[torch.Tensor]) -> torch.Tensor:
    """The runs' tensors shaped like one model's parameter, stacked in the pack's layout."""
    if layout is Layout.WEIGHT:
        return torch.stack([t.T for t in singles]).contiguous()
    together = torch.stack(singles)
    return together.unsqueeze(1) if layout is Layout.FREE else together


def copy_to(packed: nn.Module, s: int, model: nn.Module) -> None:
    """Write run s's slice of a stacked module into its separate model."""
    with torch.no_grad():
        for layout, p, one in zip(layouts(packed), packed.parameters(), model.parameters(), strict=True):
            one.copy_(single(layout, p, s))
        for b, one in zip(packed.buffers(), model.buffers(), strict=True):
            one.copy_(b[s, 0])


class PackedOptimizer:
    """The runs' optimizer over stacked parameters: `inner`, torch's own (fused) kernel made at the
    runs' shared hyperparameters and the smallest of their learning rates, lr_0. When the learning
    rates differ, each run's change in a step is rescaled by lr_s / lr_0 (>= 1): SGD's and Adam's
    updates are the learning rate times a direction that does not depend on it, so this is run s's
    own update (up to rounding; exactly, for the runs at lr_0), and the optimizer's state (momenta)
    is exactly run s's. A diverging run's huge step stays in its own slice."""

    def __init__(self, inner: torch.optim.Optimizer, lrs: list[float]):
        self.inner, self.lrs = inner, lrs
        self.ratios = None if len(set(lrs)) == 1 else torch.tensor(lrs) / min(lrs)
        self._ratios: dict[int, torch.Tensor] = {}
        self._before: list[torch.Tensor] = []

    @property
    def state(self):
        return self.inner.state

    @property
    def param_groups(self):
        return self.inner.param_groups

    def _ratio(self, p: torch.Tensor) -> torch.Tensor:
        if p.dim() not in self._ratios:  # made once, outside any captured graph
            self._ratios[p.dim()] = self.ratios.to(p.device).view(-1, *[1] * (p.dim() - 1))
        return self._ratios[p.dim()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        params = [p for group in self.inner.param_groups for p in group["params"]]
        if self.ratios is not None:
            if not self._before:
                self._before = [torch.empty_like(p) for p in params]
            for before, p in zip(self._before, params, strict=True):
                before.copy_(p)
        self.inner.step()
        if self.ratios is not None:
            for before, p in zip(self._before, params, strict=True):
                p.copy_(torch.lerp(before, p, self._ratio(p)))

    def copy_state_to(self, s: int, kinds: list[Layout], optimizer: torch.optim.Optimizer,
                      params: list[nn.Parameter]) -> None:
        """Run s's part of the optimizer state into its separate optimizer (over `params`, one run's
        parameters in the pack's order, whose layouts are `kinds`)."""
        for i, (p, one) in enumerate(zip(self.inner.param_groups[0]["params"], params, strict=True)):
            state = self.inner.state.get(p)
            if state:
                optimizer.state[one] = {k: _part(kinds[i], v, s) for k, v in state.items()}

    def load_states(self, kinds: list[Layout], optimizers: list[torch.optim.Optimizer],
                    params: list[list[nn.Parameter]]) -> None:
        """Stack the separate runs' optimizer states (a resumed pack) into this one's."""
        for i, p in enumerate(self.inner.param_groups[0]["params"]):
            states = [opt.state.get(ps[i]) for opt, ps in zip(optimizers, params, strict=True)]
            if all(states):
                self.inner.state[p] = {
                    k: (stacked(kinds[i], [st[k] for st in states]).to(p.device) if states[0][k].dim() > 0
                        else states[0][k].clone().to(p.device))
                    for k in states[0]}


def _part(layout: Layout, value: Any, s: int) -> Any:
    """Run s's part of an optimizer state entry: a stacked tensor's slice, or a shared step count."""
    if torch.is_tensor(value):
        # Contiguous, as a separate run's own state is: a slice of the stacked (S, in, out) state is a
        # transposed view, and the fused optimizers step such a state in the wrong element order.
        if value.dim() == 0:  # the shared step count
            return value.clone()
        return single(layout, value, s).clone(memory_format=torch.contiguous_format)
    return value
