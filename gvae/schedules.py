"""Temperature schedules: pure functions of the optimizer step."""

from __future__ import annotations

import math

from gvae.config import ScheduleConfig, ScheduleName


def exponential(step: int, tau0: float, rate: float, every: int, tau_min: float) -> float:
    """tau = max(tau_min, tau0 * exp(-rate * t)), t the step rounded down to a multiple of `every`
    (the paper's form; the authors' notebook recomputes tau every 1000 steps)."""
    t = (step // every) * every
    return max(tau_min, tau0 * math.exp(-rate * t))


def constant(step: int, tau0: float) -> float:
    """tau = tau0 at every step."""
    return tau0


def temperature(cfg: ScheduleConfig, step: int) -> float:
    """The temperature at `step` under the configured schedule."""
    if ScheduleName(cfg.name) is ScheduleName.constant:
        return constant(step, cfg.tau0)
    return exponential(step, cfg.tau0, cfg.rate, cfg.every, cfg.tau_min)
