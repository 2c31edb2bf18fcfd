"""The engine: S >= 1 runs built from their configs and trained by one step, behind one contract
that the training loop (gvae/trainer.py) uses without asking how many runs there are.

Every run is first built on its own (RunParts: its task module, estimator, optimizer and batch
sampler, restored from its checkpoint when resuming): that is what checkpoints and evaluation read.
One run trains those parts directly (SingleEngine). A pack (PackedEngine) stacks them (gvae/packing.py)
and trains the stack; `sync_to_runs` copies each run's slice back into its parts before a checkpoint
or an evaluation, so a packed run's checkpoint is a separate run's, and it resumes packed or alone.

The contract, for S runs:
- `train_step()`: one step of every run; a TrainStats of device tensors (figures, S). No host read.
- `set_tau(values)`: the runs' temperatures, written into `tau`, the tensor the step reads.
- `lr(s)`, `runs[s]`, `watched()` (what a divergence corrupts, each tensor (S, ...)),
  `sync_to_runs()`, `describe()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import hydra
import torch

from gvae import checkpoint as ckpt
from gvae.config import Config, StepMode, container, flatten, resolve_device
from gvae.data import BatchSampler, Splits, load_splits
from gvae.nets import Net
from gvae.objective import TrainStats
from gvae.packing import PackedOptimizer, copy_to, layouts, stack_models
from gvae.rng import CounterRNG
from gvae.roles import roles
from gvae.step import Graphs, StepFn, make_train_step, optimizer_kwargs, resolve_mode
from gvae.tasks import Task, build_task


@dataclass
class RunParts:
    """One run's own modules: what its checkpoints hold and its evaluations read."""

    model: Task
    estimator: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [*self.model.parameters(), *self.estimator.parameters()]


def build_run(cfg: Config, saved: dict | None, splits: Splits | None,
              mode: StepMode) -> tuple[RunParts, Splits]:
    """Seed, load the data onto the device (or share `splits`), build the task's model, its
    estimator and the optimizer (hydra.utils.instantiate), and restore the checkpoint `saved`."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    splits = splits if splits is not None else load_splits(cfg.data, device)
    sampler = BatchSampler(splits.train, cfg.train.batch_size, seed=cfg.seed)
    model = build_task(cfg).to(device)
    estimator = model.build_estimator(cfg.estimator).to(device)
    params = [*model.parameters(), *estimator.parameters()]
    optimizer_cls = hydra.utils.get_class(cfg.optim._target_)
    optimizer = hydra.utils.instantiate(cfg.optim)(params, **optimizer_kwargs(optimizer_cls, mode))
    if saved:
        ckpt.restore(saved, model, estimator, optimizer, sampler, device)
    return RunParts(model, estimator, optimizer, sampler), splits


def temperature_tensor(cfgs: list[Config], step: int, shape: tuple[int, ...],
                       device: torch.device) -> torch.Tensor:
    """The runs' temperatures at `step` as one device tensor of `shape` (so a compiled or captured
    step never sees a new tensor when tau changes)."""
    return torch.tensor([c.schedule.temperature(step) for c in cfgs], device=device).view(shape)


class Engine:
    """The contract (module docstring)."""

    device: torch.device
    splits: Splits
    mode: str
    runs: list[RunParts]
    tau: torch.Tensor
    step: StepFn

    def train_step(self) -> TrainStats:
        raise NotImplementedError

    def set_tau(self, values: list[float]) -> None:
        raise NotImplementedError

    def lr(self, s: int) -> float:
        raise NotImplementedError

    def watched(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def sync_to_runs(self) -> None:
        """Copy what trains into each run's parts (nothing when the parts are what trains)."""

    def describe(self) -> str:
        raise NotImplementedError


class SingleEngine(Engine):
    """One run, trained by its own modules: no batched products (a pack of one costs 10-20% on the
    CPU, README's performance section)."""

    def __init__(self, cfg: Config, parts: RunParts, splits: Splits, step: int, mode: StepMode,
                 graphs: Graphs | None = None):
        self.device, self.splits, self.runs = splits.train.device, splits, [parts]
        self.mode = mode.value
        self.tau = temperature_tensor([cfg], step, (), self.device)
        # Training noise is a function of the seed and the step alone (gvae/rng.py).
        rng = CounterRNG(cfg.seed, self.device, step)
        for latent in parts.model.latents:
            latent.rng = rng
        splits.rng = rng
        self.step = make_train_step(parts.model, parts.estimator, parts.optimizer, splits,
                                    cfg.train.precision, mode, self.tau, rng,
                                    splits.train[: cfg.train.batch_size], graphs)

    def train_step(self) -> TrainStats:
        return self.step(self.runs[0].sampler.next()).per_run()

    def set_tau(self, values: list[float]) -> None:
        self.tau.fill_(values[0])

    def lr(self, s: int) -> float:
        return self.runs[0].optimizer.param_groups[0]["lr"]

    def watched(self) -> list[torch.Tensor]:
        parts = self.runs[0]
        return [t.unsqueeze(0) for t in (*parts.params, *parts.estimator.buffers())]

    def describe(self) -> str:
        return "output"


class PackedEngine(Engine):
    """S runs stacked into one model, estimator and optimizer, trained by one batched step on each
    run's own next batch: (S, B, pixels) images."""

    def __init__(self, cfgs: list[Config], parts: list[RunParts], splits: Splits, step: int, mode: StepMode,
                 graphs: Graphs | None = None):
        self.device, self.splits, self.runs = splits.train.device, splits, parts
        first = cfgs[0]
        self.mode = mode.value
        self.model = stack_models([p.model for p in parts]).to(self.device)
        self.estimator = self.model.build_estimator(first.estimator,
                                                    [c.estimator for c in cfgs]).to(self.device)
        # The estimator's state, made with the pack's shape (S, ...) or shared: the runs' stacked, or the
        # first's.
        with torch.no_grad():
            for name, tensor in self.estimator_state():
                singles = [p.estimator.get_parameter(name) if isinstance(tensor, torch.nn.Parameter)
                           else p.estimator.get_buffer(name) for p in parts]
                tensor.copy_(torch.stack(singles) if tensor.dim() > singles[0].dim() else singles[0])
        optimizer_cls = hydra.utils.get_class(first.optim._target_)
        lrs = [c.optim.lr for c in cfgs]
        params = [*self.model.parameters(), *self.estimator.parameters()]
        inner = hydra.utils.instantiate(first.optim)(params, lr=min(lrs),
                                                     **optimizer_kwargs(optimizer_cls, mode))
        self.optimizer = PackedOptimizer(inner, lrs)
        self.layouts = layouts(self.model, self.estimator)
        self.optimizer.load_states(self.layouts, [p.optimizer for p in parts], [p.params for p in parts])
        rng = CounterRNG([c.seed for c in cfgs], self.device, step)
        for latent in self.model.latents:
            latent.rng = rng
        splits.rng = rng
        latent_dims = len(self.model.latents[0].shape)
        self.tau = temperature_tensor(cfgs, step, (len(cfgs), *[1] * (latent_dims + 1)), self.device)
        batch = splits.train[: first.train.batch_size]
        self.step = make_train_step(self.model, self.estimator, self.optimizer, splits, first.train.precision,
                                    mode, self.tau, rng, batch.expand(len(cfgs), *batch.shape), graphs)

    def train_step(self) -> TrainStats:
        """One step of every run, on each run's next batch."""
        images = self.splits.train[torch.stack([p.sampler.next_indices() for p in self.runs])]
        return self.step(images)

    def set_tau(self, values: list[float]) -> None:
        self.tau.copy_(torch.tensor(values).view(self.tau.shape))

    def lr(self, s: int) -> float:
        return self.optimizer.lrs[s]

    def estimator_state(self) -> list[tuple[str, torch.Tensor]]:
        """The packed estimator's parameters and buffers, by name."""
        return [*self.estimator.named_parameters(), *self.estimator.named_buffers()]

    def watched(self) -> list[torch.Tensor]:
        tensors = [*self.model.parameters(), *(t for _, t in self.estimator_state())]
        return [t for t in tensors if t.dim() > 0 and t.shape[0] == len(self.runs)]

    def sync_to_runs(self) -> None:
        """Copy every run's slice back into its separate modules (before a checkpoint or evaluation)."""
        for s, parts in enumerate(self.runs):
            copy_to(self.model, s, parts.model)
            with torch.no_grad():
                for name, tensor in self.estimator_state():
                    target = (parts.estimator.get_parameter(name) if isinstance(tensor, torch.nn.Parameter)
                              else parts.estimator.get_buffer(name))
                    target.copy_(tensor[s] if tensor.dim() > target.dim() else tensor)
            self.optimizer.copy_state_to(s, self.layouts, parts.optimizer, parts.params)

    def describe(self) -> str:
        return f"{len(self.runs)} runs packed, outputs"


def build_engine(cfgs: list[Config], saved: list[dict | None], splits: Splits | None = None,
                 graphs: Graphs | None = None, pack: bool = False) -> Engine:
    """Build the runs (each restored from its checkpoint in `saved`, all at the same step) and the
    engine that trains them: a run alone, or a pack (also of one run, with `pack`, as the benchmark
    measures one). `splits`: data already on the device; `graphs`: captures the graph modes' step
    (default CUDA's)."""
    steps = {s["step"] if s else 0 for s in saved}
    if len(steps) > 1:
        raise ValueError(f"runs at steps {sorted(steps)} cannot train in one pack")
    (step,) = steps
    packed = len(cfgs) > 1 or pack
    if packed:
        check_packable(cfgs)
    device = resolve_device(cfgs[0].device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    # A caller that brings its own graphs (the tests' CPU stand-in for CUDA's) gets the mode as set.
    mode = resolve_mode(cfgs[0].train.compile, device) if graphs is None else StepMode(cfgs[0].train.compile)
    parts = []
    for cfg, state in zip(cfgs, saved, strict=True):
        run, splits = build_run(cfg, state, splits, mode)
        parts.append(run)
    if packed:
        return PackedEngine(cfgs, parts, splits, step, mode, graphs)
    return SingleEngine(cfgs[0], parts[0], splits, step, mode, graphs)


# -----------------------------------------------------------------------------
# what may share a pack


def pack_key(cfg: Config) -> tuple:
    """Runs with equal keys can share a pack: every config value but those whose role lets the runs
    of a pack differ (gvae/roles.py: the seed, the learning rate, the temperature schedule's values,
    float estimator options, where the data are read from). Such a value may still not be null in
    one run and a number in another: null changes what the step computes."""
    table = dict(roles(cfg))
    return tuple(sorted((k, "null" if v is None else "set") if table[k].per_run else (k, repr(v))
                        for k, v in flatten(container(cfg)).items()))


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
