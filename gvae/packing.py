"""Packed runs: S runs of the same shapes trained by one batched step.

A small VAE leaves a GPU idle: one step is a few hundred small kernels. Packed, S runs share every
kernel: their parameters are stacked along a leading dimension, matrix products become batched
ones, and each tensor of the step carries the runs along its first dimension. Each run keeps its
own seed (initial parameters, batch order, noise: gvae/rng.py), learning rate, temperature
schedule and scalar estimator options; each writes what a separate run writes.

How: every run is first built as a separate run (gvae.train.build_training, without its step),
restored from its own checkpoint when resuming; then its parameters, estimator buffers and
optimizer state are stacked into the pack. A checkpoint or an evaluation copies the run's slice
back into its separate modules, so checkpoints have the separate runs' format and a packed run
resumes packed or alone. Packing needs the MLP network (`model.net=mlp`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gvae.config import Config
from gvae.data import Splits
from gvae.estimators import Estimator, build_estimator
from gvae.model import VAE
from gvae.nets import Net
from gvae.objective import TrainStats
from gvae.rng import CounterRNG
from gvae.step import StepFn, make_train_step

# What may differ between the runs of a pack; everything else must be equal (pack_key).
PER_RUN = {"seed", "optim.lr", "schedule.tau0", "schedule.rate", "schedule.every", "schedule.tau_min"}
WHERE_DATA_IS = {"data.root", "data.download", "data.mirrors"}  # the same data wherever it is read from


def pack_key(cfg: Config) -> tuple:
    """Runs with equal keys can share a pack: every config value but the seed, the learning rate,
    the temperature schedule's values, where the data are read from, and the estimator's float
    options (its whole-number options, such as Gumbel-Rao's k, shape the step and must be equal)."""
    from gvae.config import container, flatten

    def per_run(key: str, value: Any) -> bool:
        return (key in PER_RUN or key in WHERE_DATA_IS
                or (key.startswith("estimator.") and isinstance(value, float)))

    return tuple(sorted((k, repr(v)) for k, v in flatten(container(cfg)).items() if not per_run(k, v)))


def check_packable(cfgs: list[Config]) -> None:
    """ValueError naming the first difference that stops these runs sharing a pack."""
    if any(Net(c.model.net) is not Net.mlp for c in cfgs):
        raise ValueError("packed runs need model.net=mlp")
    first = dict(pack_key(cfgs[0]))
    for cfg in cfgs[1:]:
        other = dict(pack_key(cfg))
        for key in sorted(first.keys() | other.keys()):
            if first.get(key) != other.get(key):
                raise ValueError(f"runs differ in {key} ({first.get(key)} and {other.get(key)}): "
                                 "they cannot share a pack")


class PackedVAE(nn.Module):
    """S VAEs with MLP networks as one: each Linear's weights stacked and stored transposed, (S, in,
    out), so that inputs of shape (S, B, in) go through one batched product with no copy (on this
    2-core CPU a transposed view made the batched product copy its operand every step). Its
    parameters come in the order of one VAE's, so that the runs' slices map one to one (`single`)."""

    def __init__(self, models: list[VAE]):
        super().__init__()
        first = models[0]
        # Its own latent object: the pack's noise source must not become the separate runs'.
        self.latent, self.image_shape = copy.copy(first.latent), first.image_shape
        self.encoder = self._stack(m.encoder for m in models)
        self.decoder = self._stack(m.decoder for m in models)
        prior = torch.stack([m.prior_logits.detach() for m in models]).unsqueeze(1)  # (S, 1, *shape)
        if isinstance(first.prior_logits, nn.Parameter):
            self.prior_logits = nn.Parameter(prior)
        else:
            self.register_buffer("prior_logits", prior)

    @staticmethod
    def _stack(networks) -> nn.ModuleList:
        """Each Linear of the networks stacked into one holder of (S, in, out) weights; activations kept."""
        layers = list(zip(*networks, strict=True))
        stacked = nn.ModuleList()
        for same in layers:
            if isinstance(same[0], nn.Linear):
                holder = nn.Module()
                weights = torch.stack([layer.weight.detach().T for layer in same]).contiguous()
                holder.weight = nn.Parameter(weights)
                holder.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in same]).unsqueeze(1))
                stacked.append(holder)
            else:
                stacked.append(same[0])
        return stacked

    @staticmethod
    def _forward_layers(layers: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            weight = getattr(layer, "weight", None)
            h = torch.baddbmm(layer.bias, h, weight) if isinstance(weight, nn.Parameter) else layer(h)
        return h

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.latent.logits(self._forward_layers(self.encoder, x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._forward_layers(self.decoder, self.latent.flatten(z))

    def single(self, i: int, packed: torch.Tensor, s: int) -> torch.Tensor:
        """Run s's part, in one VAE's layout, of the i-th stacked parameter or of a tensor shaped like
        it (its optimizer state)."""
        return packed[s].T if self.kinds[i] == "weight" else packed[s, 0]

    def stacked(self, i: int, singles: list[torch.Tensor]) -> torch.Tensor:
        """The runs' tensors shaped like the i-th parameter of one VAE, stacked in the pack's layout."""
        if self.kinds[i] == "weight":
            return torch.stack([t.T for t in singles]).contiguous()
        return torch.stack(singles).unsqueeze(1)

    @property
    def kinds(self) -> list[str]:
        """Per parameter: "weight" (S, in, out), "bias" (S, 1, out) or "prior" (S, 1, *latent shape)."""
        names = [name.rsplit(".", 1)[-1] for name, _ in self.named_parameters()]
        return ["prior" if name == "prior_logits" else name for name in names]

    def copy_to(self, s: int, model: VAE) -> None:
        """Write run s's slice into its separate VAE."""
        with torch.no_grad():
            for i, (packed, single) in enumerate(zip(self.parameters(), model.parameters(), strict=True)):
                single.copy_(self.single(i, packed, s))
            if not isinstance(self.prior_logits, nn.Parameter):
                model.prior_logits.copy_(self.prior_logits[s, 0])


class PackedOptimizer:
    """The runs' optimizer over stacked parameters: torch's own (fused) kernel, at the runs' shared
    hyperparameters and the smallest of their learning rates, lr_0. When the learning rates differ,
    each run's change in a step is rescaled by lr_s / lr_0 (>= 1): SGD's and Adam's updates are the
    learning rate times a direction that does not depend on it, so this is run s's own update (up
    to rounding; exactly, for the runs at lr_0), and the optimizer's state (momenta) is exactly run
    s's. A diverging run's huge step stays in its own slice."""

    def __init__(self, optimizer_cls: type, params: list[nn.Parameter], cfgs: list[Any], kwargs: dict):
        self.lrs = [c.lr for c in cfgs]
        hyper = {k: v for k, v in dataclasses.asdict(cfgs[0]).items() if not k.startswith("_")}
        self.inner = optimizer_cls(params, **{**hyper, "lr": min(self.lrs)}, **kwargs)
        self.ratios = None if len(set(self.lrs)) == 1 else torch.tensor(self.lrs) / min(self.lrs)
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

    def copy_state_to(self, s: int, model: PackedVAE, optimizer: torch.optim.Optimizer,
                      params: list[nn.Parameter]) -> None:
        """Run s's part of the optimizer state into its separate optimizer (over `params`)."""
        for i, (packed, single) in enumerate(zip(self.inner.param_groups[0]["params"], params, strict=True)):
            state = self.inner.state.get(packed)
            if state:
                optimizer.state[single] = {k: _part(model, i, v, s) for k, v in state.items()}

    def load_states(self, model: PackedVAE, optimizers: list[torch.optim.Optimizer],
                    params: list[list[nn.Parameter]]) -> None:
        """Stack the separate runs' optimizer states (a resumed pack) into this one's."""
        for i, packed in enumerate(self.inner.param_groups[0]["params"]):
            states = [opt.state.get(ps[i]) for opt, ps in zip(optimizers, params, strict=True)]
            if all(states):
                self.inner.state[packed] = {
                    k: (model.stacked(i, [st[k] for st in states]).to(packed.device) if states[0][k].dim() > 0
                        else states[0][k].clone().to(packed.device))
                    for k in states[0]}


def _part(model: PackedVAE, i: int, value: Any, s: int) -> Any:
    """Run s's part of an optimizer state entry: a stacked tensor's slice, or a shared step count."""
    if torch.is_tensor(value):
        # Contiguous, as a separate run's own state is: a slice of the stacked (S, in, out) state is a
        # transposed view, and the fused optimizers step such a state in the wrong element order.
        if value.dim() == 0:  # the shared step count
            return value.clone()
        return model.single(i, value, s).clone(memory_format=torch.contiguous_format)
    return value


@dataclass
class PackedTraining:
    """The pack: its separate runs (models, estimators, optimizers, samplers kept for checkpoints
    and evaluation) and the stacked modules that train them."""

    runs: list[Any]  # gvae.train.Training of each run, without its step
    device: torch.device
    splits: Splits
    model: PackedVAE
    estimator: Estimator
    optimizer: PackedOptimizer
    mode: str
    step: StepFn
    tau: torch.Tensor  # (S, 1, ..., 1): broadcasts against the latent's logits
    rng: CounterRNG

    def train_step(self) -> TrainStats:
        """One step of every run, on each run's next batch: (S, B, pixels) uint8 images."""
        images = self.splits.train[torch.stack([run.sampler.next_indices() for run in self.runs])]
        return self.step(images, self.tau)

    def set_tau(self, values: list[float]) -> None:
        self.tau.copy_(torch.tensor(values).view(self.tau.shape))

    def lr(self, s: int) -> float:
        return self.optimizer.lrs[s]

    def sync_to_runs(self) -> None:
        """Copy every run's slice back into its separate modules (before a checkpoint or evaluation)."""
        for s, run in enumerate(self.runs):
            self.model.copy_to(s, run.model)
            with torch.no_grad():
                for name, buffer in self.estimator.named_buffers():
                    target = run.estimator.get_buffer(name)
                    target.copy_(buffer[s] if buffer.dim() > target.dim() else buffer)
            params = [*run.model.parameters(), *run.estimator.parameters()]
            self.optimizer.copy_state_to(s, self.model, run.optimizer, params)


def pack_trainings(cfgs: list[Config], runs: list[Any], steps: list[int]) -> PackedTraining:
    """Stack separately built runs (gvae.train.build_training with make_step=False, all at the
    same step) into one PackedTraining with its batched step."""
    from gvae.step import optimizer_kwargs, resolve_mode

    if len(set(steps)) != 1:
        raise ValueError(f"runs at steps {sorted(set(steps))} cannot share a pack")
    first = runs[0]
    device, splits = first.device, first.splits
    model = PackedVAE([run.model for run in runs]).to(device)
    estimator = build_estimator(cfgs[0].estimator, model.latent, [c.estimator for c in cfgs]).to(device)
    with torch.no_grad():
        for name, buffer in estimator.named_buffers():
            singles = [run.estimator.get_buffer(name) for run in runs]
            buffer.copy_(torch.stack(singles) if buffer.dim() > singles[0].dim() else singles[0])
    mode = resolve_mode(cfgs[0].train.compile, device)
    optimizer_cls = type(first.optimizer)
    params = [*model.parameters(), *estimator.parameters()]
    optimizer = PackedOptimizer(optimizer_cls, params, [c.optim for c in cfgs],
                                optimizer_kwargs(optimizer_cls, mode))
    if any(True for _ in estimator.parameters()):
        raise ValueError(f"estimator={cfgs[0].estimator.name} has parameters of its own: it cannot be packed")
    optimizer.load_states(model, [run.optimizer for run in runs],
                          [[*run.model.parameters(), *run.estimator.parameters()] for run in runs])
    rng = CounterRNG([c.seed for c in cfgs], device, steps[0])
    model.latent.rng = splits.rng = rng
    latent_dims = len(model.latent.shape)
    tau = torch.tensor([c.schedule.temperature(steps[0]) for c in cfgs], device=device)
    tau = tau.view(-1, *[1] * (latent_dims + 1))
    batch = cfgs[0].train.batch_size
    example = splits.train[:batch].expand(len(runs), *splits.train[:batch].shape)
    train_step = make_train_step(model, estimator, optimizer, splits, cfgs[0].train.precision, mode,
                                 batch, rng, example_images=example)
    return PackedTraining(runs, device, splits, model, estimator, optimizer, mode.value, train_step, tau, rng)
