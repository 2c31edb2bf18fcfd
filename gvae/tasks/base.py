"""The task contract: the schema base, the registry, and the methods every task implements
(gvae/tasks/__init__.py says what each is for)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING
from torch import nn

from gvae.errors import require
from gvae.latents import Latent
from gvae.model import ModelConfig
from gvae.objective import TrainStats

if TYPE_CHECKING:  # TensorBoard is imported by the trainer, which writes the summaries
    from torch.utils.tensorboard import SummaryWriter


class Objective(str, Enum):
    """What training minimises (every task has both; its test figures do not depend on it)."""

    elbo = "elbo"  # the single-sample bound: the VAE's negative ELBO, the SBN's -log p(x_lower | h)
    iwae = "iwae"  # the K-sample importance-weighted bound (Burda, Grosse & Salakhutdinov 2016)


@dataclass
class TaskConfig:
    """Base schema of the `task` group: the task's name and training objective; subclasses add
    their options."""

    name: str = MISSING
    objective: Objective = Objective.elbo
    samples: int = 5  # K of objective=iwae: -log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q

    def check(self, key: str, model: ModelConfig, image_shape: list[int]) -> None:
        """Range checks of the task's options, and of the model and data it can work with."""
        require(self.samples >= 1, f"{key}.samples", self.samples, "must be >= 1")


@dataclass(frozen=True)
class Figure:
    """An evaluation figure, per example: metrics.json holds `{split}_{key}` (and `test_bound`)."""

    key: str
    what: str
    bound: bool  # an upper bound on the negative log-likelihood (in expectation over the samples)


TASKS: dict[str, type[Task]] = {}


def register_task(config: type[TaskConfig]):
    """Class decorator: make a task selectable as `task=NAME` (stores its schema as task/NAME_schema)."""

    def add(cls: type[Task]) -> type[Task]:
        TASKS[config.name] = cls
        cls.config = config
        ConfigStore.instance().store(group="task", name=f"{config.name}_schema", node=config)
        return cls

    return add


LossFn = Callable[[torch.Tensor], torch.Tensor]


class Task(nn.Module):
    """The contract (see the module docstring). `image_shape` is the data's (C, H, W)."""

    config: ClassVar[type[TaskConfig]]
    FIGURES: ClassVar[tuple[Figure, ...]]
    TRAIN_TAGS: ClassVar[dict[str, str]]  # training figure -> TensorBoard tag, with either objective
    picture_files: ClassVar[dict[str, str]]  # gvae-sample: picture -> file name
    exact_microscope: ClassVar[bool]  # whether expected_loss is exact (else an unbiased sample)
    latents: list[Latent]
    image_shape: tuple[int, ...]

    objective: Objective = Objective.elbo
    samples: int = 1

    def set_objective(self, task: TaskConfig | None) -> None:
        """Take the training objective from the task's config (none: the single-sample one)."""
        if task is not None:
            self.objective, self.samples = Objective(task.objective), task.samples

    @property
    def train_tags(self) -> dict[str, str]:
        """Training figure -> TensorBoard tag: TRAIN_TAGS, and with objective=iwae the K-sample bound."""
        if self.objective is Objective.iwae:
            return {**self.TRAIN_TAGS, "bound": "train/bound"}
        return self.TRAIN_TAGS

    @staticmethod
    def label(model: ModelConfig, task: TaskConfig) -> str:
        """The row a table puts a run of this task in."""
        raise NotImplementedError

    def build_estimator(self, cfg, runs=None) -> nn.Module:
        """The estimator module for this model: its state is the checkpoint's "estimator"."""
        raise NotImplementedError

    def training_loss(self, estimator: nn.Module, x: torch.Tensor,
                      tau: torch.Tensor) -> tuple[torch.Tensor, TrainStats]:
        """The loss to minimise (summed over packed runs) and the step's figures."""
        raise NotImplementedError

    def nelbo(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B,): the single-sample bound with exact samples."""
        raise NotImplementedError

    def log_weights(self, x: torch.Tensor, num_samples: int,
                    generator: torch.Generator | None) -> torch.Tensor:
        """(m, B): log p(target, h_i) - log q(h_i | input) for m exact samples h_i."""
        raise NotImplementedError

    def relaxed_nelbo(self, x: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
        """(B,): the single-sample figure with relaxed samples at temperature tau (not a bound)."""
        raise NotImplementedError

    def log_images(self, writer: SummaryWriter, x: torch.Tensor, step: int,
                   generator: torch.Generator) -> None:
        """Image grids at an evaluation; x: at least 32 evaluation images."""
        raise NotImplementedError

    def pictures(self, x: torch.Tensor, generator: torch.Generator, num: int, binary: bool, image: int,
                 max_vars: int) -> dict[str, torch.Tensor]:
        """gvae-sample's grids from the test images x, keyed as picture_files."""
        raise NotImplementedError

    # The microscope: what it differentiates.
    def diag_latent(self) -> Latent:
        """The stochastic layer whose logits the microscope differentiates."""
        return self.latents[0]

    def diag_logits(self, x: torch.Tensor) -> torch.Tensor:
        """That layer's logits for x (B, *latent shape)."""
        raise NotImplementedError

    def diag_objective(self, estimator: nn.Module, logits: torch.Tensor, x: torch.Tensor,
                       tau: torch.Tensor) -> torch.Tensor:
        """(B,) whose gradient with respect to `logits` is the estimator's gradient of the objective."""
        raise NotImplementedError

    def expected_loss(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The loss given a code z of the first layer, (..., B): z (..., B or 1, *latent shape)
        broadcasts against x. Averaged over what follows z (exact if exact_microscope)."""
        raise NotImplementedError

    def analytic(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,): the part of the objective computed in closed form from the logits (a KL), or 0."""
        raise NotImplementedError


def build_task(cfg) -> Task:
    """The task module a typed Config names, with freshly initialised parameters."""
    return TASKS[cfg.task.name](cfg.model, cfg.data.image_shape, cfg.task)

