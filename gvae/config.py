"""Structured-config schemas: the typed shape of every config group.

Hydra merges the YAML files in configs/ onto these dataclasses, so a misspelt key or a value
of the wrong type stops the program at start-up with the key's full name. Range checks that
a type cannot express live in `validate`, which runs before anything else.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from gvae.errors import ConfigError


class Binarization(str, Enum):
    static = "static"  # sampled once with a fixed seed (the paper's fixed binarization)
    dynamic = "dynamic"  # resampled every training batch
    threshold = "threshold"  # pixel > 0.5
    none = "none"  # grey levels used as Bernoulli targets (the authors' notebook)


class LatentType(str, Enum):
    categorical = "categorical"
    bernoulli = "bernoulli"


class Prior(str, Enum):
    uniform = "uniform"
    learned = "learned"


class Activation(str, Enum):
    relu = "relu"
    elu = "elu"
    tanh = "tanh"
    leaky_relu = "leaky_relu"
    gelu = "gelu"


class ScheduleName(str, Enum):
    exponential = "exponential"
    constant = "constant"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class DataConfig:
    root: str = "auto"  # $GVAE_DATA_DIR, else ./data if it holds MNIST, else the per-user cache
    download: bool = True  # fetch MNIST with torchvision when it is missing
    mirrors: list[str] = field(default_factory=list)  # folder URLs to download from; empty: torchvision's
    binarization: Binarization = Binarization.static
    num_train: int = 50_000
    num_val: int = 10_000
    split_seed: int = 0
    binarize_seed: int = 0


@dataclass
class ModelConfig:
    latent: LatentType = LatentType.categorical
    num_vars: int = 20
    num_classes: int = 10
    hidden: list[int] = field(default_factory=lambda: [512, 256])
    activation: Activation = Activation.relu
    prior: Prior = Prior.uniform


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.exponential
    tau0: float = 1.0
    rate: float = 3e-5
    every: int = 1000
    tau_min: float = 0.5


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    max_steps: int = 50_000
    batch_size: int = 100
    log_every: int = 100
    eval_every: int = 5_000
    ckpt_every: int = 10_000
    precision: Precision = Precision.fp32
    compile: str = "auto"
    resume: bool = False


@dataclass
class EvalConfig:
    num_samples: int = 1000
    batch_size: int = 1000
    max_rows: int = 250_000
    images: bool = True
    relaxed: bool = False  # gvae-eval: also the relaxed-sample test loss (not a bound)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # Estimators take their own options, checked against the estimator's signature when built.
    estimator: dict[str, Any] = field(default_factory=lambda: {"name": MISSING})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"


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
    groups = sorted(p for p in config_dir().iterdir() if p.is_dir() and not p.name.startswith("_"))
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


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore, and the help's resolver in OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver("gvae_config_groups", config_groups_help, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="optim", name="adam_schema", node=AdamConfig)
    cs.store(group="optim", name="sgd_schema", node=SGDConfig)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: Any) -> None:
    """Range checks the schema's types cannot express; raise ConfigError naming the first bad key."""
    from gvae.estimators import check_estimator_config
    from gvae.step import MODES

    s, m, t, e, d = cfg.schedule, cfg.model, cfg.train, cfg.eval, cfg.data
    _require(s.tau0 > 0, "schedule.tau0", s.tau0, "must be > 0")
    _require(s.tau_min > 0, "schedule.tau_min", s.tau_min, "must be > 0")
    if ScheduleName(s.name) is ScheduleName.exponential:
        _require(s.tau_min <= s.tau0, "schedule.tau_min", s.tau_min, f"must be <= schedule.tau0={s.tau0}")
    _require(s.rate >= 0, "schedule.rate", s.rate, "must be >= 0")
    _require(s.every >= 1, "schedule.every", s.every, "must be >= 1")
    _require(m.num_vars >= 1, "model.num_vars", m.num_vars, "must be >= 1")
    if LatentType(m.latent) is LatentType.categorical:
        _require(m.num_classes >= 2, "model.num_classes", m.num_classes, "must be >= 2")
    _require(all(h >= 1 for h in m.hidden), "model.hidden", list(m.hidden), "layer sizes must be >= 1")
    for key in ("max_steps", "batch_size", "log_every", "eval_every", "ckpt_every"):
        _require(t[key] >= 1, f"train.{key}", t[key], "must be >= 1")
    _require(t.compile in MODES, "train.compile", t.compile, f"one of {list(MODES)}")
    for key in ("num_samples", "batch_size", "max_rows"):
        _require(e[key] >= 1, f"eval.{key}", e[key], "must be >= 1")
    _require(d.num_val >= 1, "data.num_val", d.num_val, "must be >= 1")
    _require(d.num_train >= t.batch_size, "data.num_train", d.num_train,
             f"must be >= train.batch_size={t.batch_size}")
    _require(d.num_train + d.num_val <= 60_000, "data.num_train", d.num_train,
             f"data.num_train + data.num_val (={d.num_val}) must be <= 60000, MNIST's training images")
    _require_optimizer(cfg.optim.get("_target_"))
    _require(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "must be > 0")
    try:
        check_estimator_config(cfg.estimator)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    resolve_device(cfg.device)


def _require_optimizer(target: Any) -> None:
    """The optimizer's `_target_` must name a torch.optim.Optimizer class."""
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except (ImportError, ValueError):
        cls = None
    _require(isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer), "optim._target_", target,
             "a torch.optim.Optimizer class (optim=adam or optim=sgd)")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; a CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not allowed: one of auto, cpu, cuda, cuda:N") from None
    _require(device.type in ("cpu", "cuda"), "device", name, "one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        _require(torch.cuda.is_available(), "device", name, "CUDA is not available on this machine")
        index = device.index or 0
        count = torch.cuda.device_count()
        _require(index < count, "device", name, f"this machine has {count} CUDA device(s)")
    return device
