"""Successive halving (Jamieson & Talwalkar 2016) over a sweep's settings, on the validation figure.

Every setting of a cell (the jobs that share the values of the cell's keys: a latent type and an
estimator, say) trains to the first rung's number of steps; the best 1/eta of them by their
validation figure at that step train on, by resuming, to the next rung; and so on. The last rung's
best setting is the cell's choice, trained again with more seeds at the last rung's budget if asked.

The decisions are a function of the jobs' validation curves alone (the figure at each rung's step,
never a test figure), so the sweeper that launches the rungs (hydra/sweeper=rows with `halving`)
and the table that reports them (gvae/table.py) reach them the same way, and a sweep resumed after
an interruption makes the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from gvae.errors import ConfigError
from gvae.rows import key_of


@dataclass
class HalvingConfig:
    """`hydra.sweeper.halving` of the rows sweeper."""

    rungs: list[int] = field(default_factory=list)  # train.max_steps of each rung, increasing; none: off
    eta: int = 3  # each rung keeps the best ceil(n / eta) settings of a cell
    min_kept: int = 1  # but at least this many, up to the last rung (which keeps its best alone)
    cell: list[str] = field(default_factory=lambda: ["model", "task", "estimator"])  # keys making a cell
    seeds: list[int] = field(default_factory=list)  # the choice trained again with these seeds

    def check(self, key: str = "hydra.sweeper.halving") -> None:
        if any(r < 1 for r in self.rungs) or sorted(set(self.rungs)) != list(self.rungs):
            raise ConfigError(f"{key}.rungs: {list(self.rungs)}: a list of increasing step counts >= 1")
        if self.rungs and self.eta < 2:
            raise ConfigError(f"{key}.eta: {self.eta}: must be >= 2 (the fraction kept is 1/eta)")
        if self.min_kept < 1:
            raise ConfigError(f"{key}.min_kept: {self.min_kept}: must be >= 1")


def kept(n: int, eta: int, min_kept: int = 1) -> int:
    """How many of n settings go on to the next rung: ceil(n / eta), at least min_kept (and at most n)."""
    return min(n, max(min_kept, math.ceil(n / eta)))


def value_at(curve: Sequence[Sequence[float]] | None, step: int) -> float:
    """The validation figure at `step` of a [[step, value], ...] curve; inf if the run never got there
    (it failed or diverged: it is out) or the value is not finite."""
    for at, value in curve or []:
        if at == step:
            return value if math.isfinite(value) else math.inf
    return math.inf


Key = Hashable


@dataclass
class Rung:
    steps: int
    scores: dict[Key, float]  # every setting that trained to this rung: its validation figure there
    survivors: list[Key]  # those that go on (the last rung: the choice alone)


def rung(alive: Sequence[Key], score: Callable[[Key, int], float], steps: int, eta: int,
         last: bool, min_kept: int = 1) -> Rung:
    """One rung of one cell: the settings `alive` scored at `steps` (`score(setting, steps)`: its
    validation figure there, inf if it has none); the best kept(n, eta, min_kept) go on, or at the
    last rung the best alone. Ties go to the earlier setting: decisions do not depend on dict order."""
    scores = {s: score(s, steps) for s in alive}
    order = sorted(alive, key=lambda s: (scores[s], alive.index(s)))
    return Rung(steps, scores, order[: 1 if last else kept(len(alive), eta, min_kept)])


def decide(settings: Sequence[Key], score: Callable[[Key, int], float], rungs: Sequence[int],
           eta: int, min_kept: int = 1) -> list[Rung]:
    """Every rung of one cell, from all its settings to its choice (the last rung's survivor)."""
    out, alive = [], list(settings)
    for i, steps in enumerate(rungs):
        out.append(rung(alive, score, steps, eta, i == len(rungs) - 1, min_kept))
        alive = out[-1].survivors
    return out


def cells(jobs: Mapping[Key, Sequence[str]], cell_keys: Sequence[str]) -> dict[tuple[str, ...], list[Key]]:
    """Jobs (id: overrides) grouped by their values of the cell's keys, in the jobs' order."""
    grouped: dict[tuple[str, ...], list[Key]] = {}
    for job, overrides in jobs.items():
        by_key = {key_of(o): o for o in overrides}
        grouped.setdefault(tuple(by_key.get(k, f"{k}=(default)") for k in cell_keys), []).append(job)
    return grouped

