"""Temperature schedules: pure functions of the optimizer step, and their typed configs
(one schema per option of the `schedule` group)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import MISSING

from gvae.errors import require
from gvae.roles import per_run


def exponential(step: int, tau0: float, rate: float, every: int, tau_min: float) -> float:
    """tau = max(tau_min, tau0 * exp(-rate * t)), t the step rounded down to a multiple of `every`
    (the paper's form; the authors' notebook recomputes tau every 1000 steps)."""
    t = (step // every) * every
    return max(tau_min, tau0 * math.exp(-rate * t))


def constant(step: int, tau0: float) -> float:
    """tau = tau0 at every step."""
    return tau0


@dataclass
class ScheduleConfig:
    """Base schema of the `schedule` group: a name and the starting temperature."""

    name: str = MISSING
    tau0: float = per_run(1.0)  # each run of a pack may follow its own schedule

    def temperature(self, step: int) -> float:
        return constant(step, self.tau0)

    def next_change(self, step: int) -> float:
        """The first step after `step` at which the temperature may differ (inf: never)."""
        return math.inf

    def check(self, key: str) -> None:
        require(SCHEDULES.get(self.name) is type(self), f"{key}.name", self.name,
                f"this schedule's schema is {type(self).__name__}; choose another with schedule=NAME")
        require(self.tau0 > 0, f"{key}.tau0", self.tau0, "must be > 0")


@dataclass
class ConstantSchedule(ScheduleConfig):
    """`schedule=constant`: tau0 throughout."""

    name: str = "constant"


@dataclass
class ExponentialSchedule(ScheduleConfig):
    """`schedule=exponential`: the paper's tau = max(tau_min, tau0 exp(-rate t)), updated every
    `every` steps (defaults: the authors' notebook)."""

    name: str = "exponential"
    rate: float = per_run(3e-5)
    every: int = per_run(1000)
    tau_min: float = per_run(0.5)

    def temperature(self, step: int) -> float:
        return exponential(step, self.tau0, self.rate, self.every, self.tau_min)

    def next_change(self, step: int) -> float:
        return (step // self.every + 1) * self.every

    def check(self, key: str) -> None:
        super().check(key)
        require(self.tau_min > 0, f"{key}.tau_min", self.tau_min, "must be > 0")
        require(self.tau_min <= self.tau0, f"{key}.tau_min", self.tau_min,
                f"must be <= {key}.tau0={self.tau0}")
        require(self.rate >= 0, f"{key}.rate", self.rate, "must be >= 0")
        require(self.every >= 1, f"{key}.every", self.every, "must be >= 1")


SCHEDULES = {"constant": ConstantSchedule, "exponential": ExponentialSchedule}
