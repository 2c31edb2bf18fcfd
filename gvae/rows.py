"""The rows of a sweep (hydra/sweeper=rows): Hydra's product of swept values, once per row of
overrides. Shared by the sweeper (hydra_plugins/gvae_plugins/rows_sweeper.py), which launches the
jobs, and the table (gvae/table.py), which checks that every one of them ran."""

from __future__ import annotations


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def cross(jobs: list[list[str]], rows: list[str]) -> list[list[str]]:
    """Every job once per row (the row's overrides replacing the job's for the same keys), each
    distinct job once: a swept key that a row sets (an experiment's inherited `estimator` list, say)
    would otherwise launch the same run once per value it replaced."""
    if not rows:
        return jobs
    crossed: dict[frozenset[str], list[str]] = {}
    for job in jobs:
        for row in rows:
            extra = row.split()
            keys = {key_of(o) for o in extra}
            new = [o for o in job if key_of(o) not in keys] + extra
            crossed.setdefault(frozenset(new), new)  # the first occurrence keeps its place
    return list(crossed.values())


# What a halving sweep (gvae/halving.py) adds to a job's overrides at each rung: how long it trains
# (the rung's steps), that it resumes its own folder, and which folder that is (its number).
HALVING_KEYS = ("train.max_steps", "train.resume", "hydra.sweep.subdir")


def halving_job(overrides: list[str], steps: int, num: int) -> list[str]:
    """A job's overrides at a rung of `steps` steps, in the folder of job number `num`."""
    return [o for o in overrides if key_of(o) not in HALVING_KEYS] + [
        f"train.max_steps={steps}", "train.resume=true", f"hydra.sweep.subdir={num}"]
