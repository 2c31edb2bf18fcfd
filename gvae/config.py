"""The run's configuration: the root schema, the schemas of the train/eval/optim groups, their
registration with Hydra, and `validate`, which turns a composed config into typed objects.

Each component owns the schema of its group (data.py, mnist.py, synthetic.py, tasks/, model.py,
schedules.py, estimators.py), and each field says what its key means to a run (roles.py); this
module assembles them. Hydra merges the YAML files in configs/
onto the schemas, so a misspelt key or a value of the wrong type stops the program at start-up
with the key's full name; `validate` adds the range checks a type cannot express and returns the
config as plain dataclasses, so that nothing after start-up reads through OmegaConf.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.resources
import importlib.util
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gvae.data import DataConfig
from gvae.errors import ConfigError, require
from gvae.estimators import ESTIMATORS, EstimatorConfig, estimator_help
from gvae.mnist import FashionMNISTConfig, KMNISTConfig, MNISTConfig
from gvae.model import ModelConfig
from gvae.roles import (
    CADENCE,
    CHECKPOINTS,
    DEVICE,
    EVALUATION,
    EXECUTION,
    LENGTH,
    SEED,
    per_run,
    role_field,
    roles,
)
from gvae.schedules import SCHEDULES, ScheduleConfig
from gvae.synthetic import SyntheticConfig
from gvae.tasks import TASKS, TaskConfig

DATASETS = {"mnist": MNISTConfig, "fashion_mnist": FashionMNISTConfig, "kmnist": KMNISTConfig,
            "synthetic": SyntheticConfig}


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class StepMode(str, Enum):
    auto = "auto"  # graph on CUDA, eager on the CPU
    eager = "eager"
    compile = "compile"
    graph = "graph"  # CUDA only
    compile_graph = "compile_graph"  # CUDA only


@dataclass
class TrainConfig:
    max_steps: int = role_field(LENGTH, 50_000)
    batch_size: int = 100
    log_every: int = role_field(CADENCE, 100)
    eval_every: int = role_field(CADENCE, 5_000)
    ckpt_every: int = role_field(CHECKPOINTS, 10_000)
    precision: Precision = Precision.fp32
    compile: StepMode = role_field(EXECUTION, StepMode.auto)
    resume: bool = role_field(EXECUTION, False)  # continue from this run folder's checkpoints/last.pt
    # Replace a run already in the folder on purpose (its checkpoint, records, events and pictures are
    # deleted first); without it, a folder holding a run is refused unless train.resume continues it.
    overwrite: bool = role_field(EXECUTION, False)

    def check(self, key: str) -> None:
        for name in ("max_steps", "batch_size", "log_every", "eval_every", "ckpt_every"):
            require(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "must be >= 1")
        require(not (self.resume and self.overwrite), f"{key}.overwrite", self.overwrite,
                f"{key}.resume=true continues the run in the folder, {key}.overwrite=true replaces it: "
                "choose one")


MAX_EVAL_SAMPLES = 100_000  # m beyond this costs hours for 10,000 test images, even on a GPU
SEED_LIMIT = 2**32  # seeds in [0, 2^32): every random stream takes them whole, so distinct seeds differ


@dataclass
class EvalConfig:
    num_samples: int = 1000  # m of the multi-sample test bound
    batch_size: int = 1000  # images per pass for the single-sample bounds
    max_rows: int = 250_000  # (image, sample) pairs per decoder pass for the m-sample bound
    images: bool = True  # image grids in TensorBoard at each evaluation
    relaxed: bool = False  # gvae-eval: also the relaxed-sample test loss (not a bound)

    def check(self, key: str) -> None:
        for name in ("num_samples", "batch_size", "max_rows"):
            require(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "must be >= 1")
        require(self.num_samples <= MAX_EVAL_SAMPLES, f"{key}.num_samples", self.num_samples,
                f"must be <= {MAX_EVAL_SAMPLES:,}: the bound's cost grows with m (m = 1000 is the paper's)")


@dataclass
class DiagConfig:
    """The gradient microscope during training (gvae/diagnostics.py)."""

    every: int = 0  # steps between diagnoses; 0: off
    draws: int = 100  # draws of the estimator's gradient
    batch: int = 16  # validation images (the first ones: the same batch every time)
    max_codes: int = 4096  # the exact reference when an image has at most this many codes
    reference_draws: int = 32  # draws of the local expectation gradient otherwise

    def check(self, key: str) -> None:
        require(self.every >= 0, f"{key}.every", self.every, "must be >= 0 (0: off)")
        require(self.max_codes >= 0, f"{key}.max_codes", self.max_codes, "must be >= 0")
        for name in ("draws", "batch", "reference_draws"):
            require(getattr(self, name) >= 2, f"{key}.{name}", getattr(self, name),
                    "must be >= 2 (a variance needs two draws)")


@dataclass
class OptimConfig:
    """Base schema of the `optim` group: a torch.optim class, built by hydra.utils.instantiate once
    the parameters exist (`_partial_`)."""

    _target_: str = MISSING
    _partial_: bool = True
    lr: float = per_run(1e-3)
    weight_decay: float = 0.0

    def check(self, key: str) -> None:
        require(self._partial_ is True, f"{key}._partial_", self._partial_,
                "must be true: the optimizer is built once the parameters exist")
        module, _, name = str(self._target_).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except (ImportError, ValueError):
            cls = None
        require(isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer), f"{key}._target_",
                self._target_, "a torch.optim.Optimizer class (optim=adam or optim=sgd)")
        require(self.lr > 0, f"{key}.lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay, "must be >= 0")
        require(self.weight_decay * self.lr < 1, f"{key}.weight_decay", self.weight_decay,
                f"must be < 1 / {key}.lr = {1 / self.lr:g}: a larger decay overshoots zero at every step")


@dataclass
class AdamConfig(OptimConfig):
    _target_: str = "torch.optim.Adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def check(self, key: str) -> None:
        super().check(key)
        ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        require(ok, f"{key}.betas", list(self.betas), "two numbers in [0, 1)")
        require(self.eps > 0, f"{key}.eps", self.eps, "must be > 0")


@dataclass
class SGDConfig(OptimConfig):
    _target_: str = "torch.optim.SGD"
    momentum: float = 0.9
    nesterov: bool = False

    def check(self, key: str) -> None:
        super().check(key)
        require(0 <= self.momentum < 1, f"{key}.momentum", self.momentum,
                "must be in [0, 1): at 1 or more the velocity never decays and the run diverges")
        require(not self.nesterov or self.momentum > 0, f"{key}.nesterov", self.nesterov,
                f"Nesterov momentum needs {key}.momentum > 0")


@dataclass
class Config:
    data: DataConfig = MISSING
    task: TaskConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    estimator: EstimatorConfig = MISSING
    schedule: ScheduleConfig = MISSING
    optim: OptimConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = role_field(EVALUATION, default_factory=EvalConfig)
    diag: DiagConfig = role_field(CADENCE, default_factory=DiagConfig)
    seed: int = role_field(SEED, 0)
    device: str = role_field(DEVICE, "auto")

    def check(self) -> None:
        """Every range check, each group's own first; ConfigError naming the first bad key."""
        check_finite(self)
        for key in ("seed", "data.split_seed", "data.binarize_seed", "data.seed"):
            value = leaf(self, key)
            require(value is None or 0 <= value < SEED_LIMIT, key, value,
                    "must be in [0, 2^32): every random stream takes it whole, so distinct seeds differ")
        require(DATASETS.get(self.data.name) is type(self.data), "data.name", self.data.name,
                f"one of {sorted(DATASETS)}, chosen with data=NAME")
        self.data.check("data")
        require(TASKS.get(self.task.name) is not None and isinstance(self.task, TASKS[self.task.name].config),
                "task.name", self.task.name, f"one of {sorted(TASKS)}, chosen with task=NAME")
        self.model.check("model", list(self.data.image_shape))
        self.task.check("task", self.model, list(self.data.image_shape))
        self.estimator.check("estimator")
        self.estimator.check_latent("estimator", self.model.latent.value)
        self.estimator.check_objective("estimator", self.task.objective.value, self.task.samples)
        self.schedule.check("schedule")
        self.optim.check("optim")
        self.train.check("train")
        self.eval.check("eval")
        self.diag.check("diag")
        require(self.data.num_train >= self.train.batch_size, "data.num_train", self.data.num_train,
                f"must be >= train.batch_size={self.train.batch_size}")
        check_memory(self, resolve_device(self.device))


def leaf(cfg: Any, key: str) -> Any:
    """The value at a dotted key of a typed config, or None where the schema has no such key."""
    node = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def check_finite(cfg: Config) -> None:
    """ConfigError naming the first float value (or list entry) that is nan or infinite: no key of
    gvae's means anything at either."""
    for key, _ in roles(cfg):
        value = leaf(cfg, key)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}={value!r} is not allowed: must be a finite number")


def memory_estimate(cfg: Config) -> float:
    """A lower bound on the bytes a run allocates at once (float32; data uint8): the model's
    parameters with their gradient and two optimizer moments; a training step's saved activations
    (the batch, with task.objective=iwae's K samples and an estimator's k draws); an evaluation
    pass's largest layer output (eval.max_rows rows); the microscope's draws; the data."""
    pixels = math.prod(cfg.data.image_shape)
    latent = cfg.model.num_vars * (cfg.model.num_classes if cfg.model.latent.value == "categorical" else 1)
    widths = [pixels, *cfg.model.hidden, latent]
    nets = max(2, getattr(cfg.task, "layers", 1))  # encoder and decoder, or the SBN's conditionals
    params = nets * sum(a * b for a, b in zip(widths, widths[1:], strict=False))
    row = 2 * sum(widths)  # one example's activations through the encoder and the decoder
    samples = cfg.task.samples if cfg.task.objective.value == "iwae" else 1
    draws = getattr(cfg.estimator, "k", 1)
    diag_rows = (cfg.diag.draws + cfg.diag.max_codes) * cfg.diag.batch if cfg.diag.every else 0
    return (16.0 * params + 4.0 * cfg.train.batch_size * samples * (row + draws * latent)
            + 4.0 * max(cfg.eval.max_rows, cfg.eval.batch_size, diag_rows) * max(widths)
            + 1.0 * cfg.data.bytes_needed())


# The keys that size a run's allocations: the one whose own value makes a run too big is named.
SIZE_KEYS = ("model.num_vars", "model.num_classes", "model.hidden", "data.image_shape", "train.batch_size",
             "task.samples", "task.layers", "estimator.k", "eval.max_rows", "eval.batch_size",
             "data.num_train", "data.num_val", "data.num_test", "data.patterns", "diag.draws", "diag.batch",
             "diag.max_codes")


def available_memory(device: torch.device) -> int:
    """Bytes the device has in all: the GPU's memory, or this machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: Config, device: torch.device) -> None:
    """ConfigError when a run could not fit the device (sizes of 10^12 would otherwise reach torch's
    allocator, or a machine's swap), naming the key whose own value does it: the one whose schema
    default shrinks the estimate most, with the estimate and what the device has."""
    need, have = memory_estimate(cfg), available_memory(device)
    if need <= have:
        return

    def without(key: str) -> float:  # the estimate with this key at its schema's default
        *path, name = key.split(".")
        node = leaf(cfg, ".".join(path)) if path else cfg
        if node is None or not hasattr(node, name):
            return need
        default = getattr(type(node)(), name)
        saved = getattr(node, name)
        setattr(node, name, default)
        try:
            return memory_estimate(cfg)
        finally:
            setattr(node, name, saved)

    key = min(SIZE_KEYS, key=without)
    raise ConfigError(f"{key}={leaf(cfg, key)!r} is not allowed: the run would allocate at least "
                      f"{need / 2**30:,.1f} GiB at once, and {device} has {have / 2**30:,.1f} GiB")


# -----------------------------------------------------------------------------
# Hydra: registration, where the YAML files are, composing


def import_extensions() -> None:
    """Import the modules named in $GVAE_IMPORT (comma-separated), where your own estimators live:
    their @register makes `estimator=NAME` known before Hydra composes the config."""
    for name in filter(None, (n.strip() for n in os.environ.get("GVAE_IMPORT", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"$GVAE_IMPORT names {name!r}, which cannot be imported: {e}") from None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore, and the help's resolvers in OmegaConf (idempotent).
    The tasks' schemas are stored by their @register_task; the estimators' here, so that gvae.estimators
    needs no Hydra (every one registered by now: gvae's, and yours imported through $GVAE_IMPORT)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for name, cls in ESTIMATORS.items():
        cs.store(group="estimator", name=f"{name}_schema", node=cls.config)
    for group, options in (("data", DATASETS), ("schedule", SCHEDULES),
                           ("optim", {"adam": AdamConfig, "sgd": SGDConfig})):
        for name, node in options.items():
            cs.store(group=group, name=f"{name}_schema", node=node)
    OmegaConf.register_new_resolver("gvae_config_groups", config_groups_help, replace=True)
    OmegaConf.register_new_resolver("gvae_estimators", estimator_help, replace=True)
    # Cached, as Hydra's `now` is: a sweep's jobs, even in other processes, see the launching one's.
    OmegaConf.register_new_resolver("gvae_pid", os.getpid, replace=True, use_cache=True)


def config_path() -> str:
    """Where Hydra finds configs/: the package `gvae.configs` when gvae is installed (configs/
    ships inside it), else the checkout's own configs/ folder, for a checkout run uninstalled
    with PYTHONPATH=<checkout> (as on the GPU machine, where nothing is installed)."""
    if importlib.util.find_spec("gvae.configs") is not None:
        return "pkg://gvae.configs"
    return str(Path(__file__).resolve().parent.parent / "configs")


def config_dir() -> Path:
    """The folder of configs/ itself, installed or in the checkout."""
    path = config_path()
    if path.startswith("pkg://"):
        return Path(str(importlib.resources.files(path.removeprefix("pkg://"))))
    return Path(path)


def config_groups_help() -> str:
    """One line per config group with its options (the YAML files; the schemas behind them are not
    options), for gvae-train --help."""
    groups = sorted(p for p in config_dir().iterdir()
                    if p.is_dir() and not p.name.startswith("_") and any(p.glob("*.yaml")))
    return "\n".join(f"{g.name}: {', '.join(sorted(f.stem for f in g.glob('*.yaml')))}" for g in groups)


@contextmanager
def hydra_initialized() -> Iterator[None]:
    """Hydra's compose API pointed at gvae's configs, wherever they are (see config_path)."""
    from hydra import initialize_config_dir, initialize_config_module

    register_configs()
    path = config_path()
    if path.startswith("pkg://"):
        with initialize_config_module(config_module=path.removeprefix("pkg://"), version_base="1.3"):
            yield
    else:
        with initialize_config_dir(config_dir=path, version_base="1.3"):
            yield


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `gvae-train <overrides>` would run with, without Hydra's runtime section
    (for tests and scripts that call the library directly)."""
    from hydra import compose

    with hydra_initialized():
        return compose(config_name="config", overrides=overrides or [])


# -----------------------------------------------------------------------------
# validation: composed config -> typed objects


def _schema_keys(node: Any, prefix: str = "") -> Iterator[tuple[str, list[str]]]:
    """(key, the keys its schema allows) for every key of a composed config, depth first."""
    schema = OmegaConf.get_type(node)
    allowed = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        full = f"{prefix}{key}"
        if allowed is not None:
            yield full, [f"{prefix}{a}" for a in allowed]
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            yield from _schema_keys(child, f"{full}.")


def check_known_keys(cfg: DictConfig) -> None:
    """ConfigError naming a key that no schema knows (as `+train.max_step=10` adds one), with the
    closest known key."""
    for key, allowed in _schema_keys(cfg):
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the keys here: {', '.join(allowed)}"
            raise ConfigError(f"{key} is not a config key{hint}")


def validate(cfg: DictConfig) -> Config:
    """Check the composed config (unknown keys, missing values, ranges) before anything is built
    or written; return it as typed dataclasses. ConfigError names the first bad key."""
    check_known_keys(cfg)
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "the config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
    typed.check()
    return typed


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; a CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not allowed: one of auto, cpu, cuda, cuda:N") from None
    require(device.type in ("cpu", "cuda"), "device", name, "one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        require(torch.cuda.is_available(), "device", name, "CUDA is not available on this machine")
        index = device.index or 0
        count = torch.cuda.device_count()
        require(index < count, "device", name, f"this machine has {count} CUDA device(s)")
    return device


OPTIMIZERS = {"torch.optim.Adam": AdamConfig, "torch.optim.SGD": SGDConfig}


def config_from_dict(values: dict[str, Any]) -> DictConfig:
    """A run's saved config (plain values, as in a checkpoint or .hydra/config.yaml) typed again with
    each group's schema, chosen by the group's name. Keys added to a schema since the run was
    made take their defaults, which is what the older code did."""
    def pick(options: dict[str, type], group: str, key: str, default: str | None = None) -> Any:
        name = (values.get(group) or {}).get(key, default)
        if name not in options:
            raise ConfigError(f"{group}.{key}={name!r} in a saved config is not known here: "
                              f"one of {sorted(options)}")
        return options[name]()

    schemas = {"data": DATASETS, "estimator": {n: c.config for n, c in ESTIMATORS.items()},
               "schedule": SCHEDULES, "optim": OPTIMIZERS}
    # A run saved before tasks existed is the VAE's.
    schema = Config(data=pick(DATASETS, "data", "name", "mnist"),
                    task=pick({n: c.config for n, c in TASKS.items()}, "task", "name", "vae"),
                    estimator=pick(schemas["estimator"], "estimator", "name"),
                    schedule=pick(SCHEDULES, "schedule", "name"), optim=pick(OPTIMIZERS, "optim", "_target_"))
    names = [f.name for f in dataclasses.fields(Config)]
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), {k: values[k] for k in names if k in values})
    except OmegaConfBaseException as e:
        raise ConfigError(f"a saved config does not fit today's schema: {str(e).splitlines()[0]}") from None


def container(cfg: DictConfig | Config) -> dict[str, Any]:
    """The config as plain dicts and lists (enums as their names), for checkpoints and logs."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.key: value} for the dicts of a plain config container; lists stay values."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, child in node.items() for k, v in flatten(child, f"{prefix}{key}.").items()}
