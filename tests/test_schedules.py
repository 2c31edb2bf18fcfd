"""Temperature schedules against values computed by hand."""

from __future__ import annotations

import pytest

from gvae.config import validate
from gvae.schedules import ExponentialSchedule, constant, exponential
from tests.conftest import compose_config

# (step, expected tau) for tau0 = 1, rate = 1e-4, every = 1000, tau_min = 0.5 (the paper's grid):
# t = step rounded down to a multiple of 1000, tau = max(0.5, exp(-1e-4 t)).
PAPER = [
    (0, 1.0),
    (999, 1.0),  # t = 0 until the first multiple of `every`
    (1000, 0.9048374180),  # exp(-0.1)
    (1999, 0.9048374180),
    (2500, 0.8187307531),  # t = 2000: exp(-0.2)
    (6999, 0.5488116361),  # t = 6000: exp(-0.6)
    (7000, 0.5),  # exp(-0.7) = 0.4966 is under the floor
    (50_000, 0.5),
]


@pytest.mark.parametrize("step, tau", PAPER)
def test_exponential_schedule_rounds_steps_down_and_stops_at_tau_min(step, tau):
    assert exponential(step, tau0=1.0, rate=1e-4, every=1000, tau_min=0.5) == pytest.approx(tau, abs=1e-9)


@pytest.mark.parametrize(
    "step, tau",
    [(0, 2.0), (499, 2.0), (1234, 1.9408910671), (1500, 1.9119949637)],  # 2 exp(-3e-5 t), t = 1000, 1500
)
def test_exponential_schedule_scales_with_tau0_and_every(step, tau):
    assert exponential(step, tau0=2.0, rate=3e-5, every=500, tau_min=0.1) == pytest.approx(tau, abs=1e-9)


def test_exponential_schedule_with_every_one_changes_each_step():
    assert exponential(1, tau0=1.0, rate=0.1, every=1, tau_min=0.0) == pytest.approx(0.9048374180, abs=1e-9)


def test_exponential_schedule_with_rate_zero_stays_at_tau0():
    assert exponential(123_456, tau0=0.8, rate=0.0, every=1000, tau_min=0.5) == 0.8


@pytest.mark.parametrize("step", [0, 1, 1000, 10**6])
def test_constant_schedule_is_tau0_at_every_step(step):
    assert constant(step, tau0=0.7) == 0.7


@pytest.mark.parametrize(
    "overrides, step, tau",
    [
        # The default (the authors' notebook): tau0 1, rate 3e-5, every 1000, tau_min 0.5.
        ([], 0, 1.0),
        ([], 12_345, 0.6976763261),  # t = 12000: exp(-0.36)
        ([], 25_000, 0.5),  # exp(-0.75) = 0.4724 is under the floor
        (["schedule=constant", "schedule.tau0=0.7"], 10**6, 0.7),
    ],
)
def test_temperature_follows_the_configured_schedule(overrides, step, tau):
    cfg = validate(compose_config(overrides))
    assert cfg.schedule.temperature(step) == pytest.approx(tau, abs=1e-9)


@pytest.mark.parametrize("every", [1, 7, 1000])
def test_the_temperature_changes_only_at_the_steps_next_change_names(every):
    """The training loop recomputes tau only at next_change(step): nowhere else may it differ."""
    schedule = ExponentialSchedule(rate=0.1 / every, every=every, tau_min=0.01)
    step, change_at = 0, schedule.next_change(0)
    for step in range(1, 3 * every + 5):
        if step < change_at:
            assert schedule.temperature(step) == schedule.temperature(step - 1)
        else:
            assert step == change_at and schedule.temperature(step) < schedule.temperature(step - 1)
            change_at = schedule.next_change(step)


def test_a_constant_schedule_never_changes():
    cfg = validate(compose_config(["schedule=constant"]))
    assert cfg.schedule.next_change(0) == float("inf")
