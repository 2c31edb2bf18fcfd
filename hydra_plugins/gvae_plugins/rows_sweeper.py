"""`hydra/sweeper=rows`: Hydra's basic sweeper, crossed with a list of rows (a Hydra plugin: Hydra
loads sweepers only from the hydra_plugins package).

Hydra's basic sweeper launches the product of its swept keys. A table like the paper's needs some
keys only in some rows (the temperature schedule matters only to estimators with a temperature),
and a product would launch the other rows once per schedule for nothing. Here each row is a set
of overrides (a space-separated string); every job of the product runs once per row, the row's
keys taking precedence:

    hydra:
      sweeper:
        params: {seed: "0,1,2", optim.lr: "1e-3,3e-3"}
        rows:
          - estimator=score_function
          - estimator=gumbel_softmax schedule.every=500 schedule.rate=1e-5

With `halving` the jobs are not all trained to the end: successive halving (gvae/halving.py) trains
every job to the first rung's steps, and each cell's best 1/eta by the validation figure there go on,
resumed in their own folders, to the next rung; the last rung's best is the cell's choice, trained
again with `seeds` at the last rung's budget:

        halving: {rungs: [2000, 6000, 18000], eta: 3, min_kept: 2, cell: [model, estimator], seeds: [1, 2]}

(on the command line: hydra.sweeper.halving.rungs=[2000,6000,18000] and so on).

Each job's folder is its number in the grid (the seeds' after the grid's), whatever
hydra.sweep.subdir says, so that a survivor resumes where it trained; every launch has
train.resume=true, so the same command resumes an interrupted sweep and makes the same decisions.
halving.json in the sweep folder lists them.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it is in
# sys.modules, where dataclasses would look up string annotations.
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from gvae.files import write_json
from gvae.halving import HalvingConfig, cells, value_at
from gvae.halving import rung as halving_rung
from gvae.rows import cross, halving_job, key_of

log = logging.getLogger(__name__)


@dataclass
class RowsSweeperConf:
    _target_: str = "hydra_plugins.gvae_plugins.rows_sweeper.RowsSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    rows: list[str] = field(default_factory=list)
    halving: HalvingConfig = field(default_factory=HalvingConfig)  # no rungs: every job to the end


ConfigStore.instance().store(group="hydra/sweeper", name="rows", node=RowsSweeperConf, provider="gvae")


class RowsSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None,
                 rows: list[str] | None = None, halving: Any = None):
        # BasicSweeper.__init__ names its own class through its module, which Hydra's plugin scan
        # executes a second time (making a new class that this one does not derive from): its
        # attributes are set here instead.
        self.overrides = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context = self.config = self.launcher = None
        self.rows = list(rows or [])
        halving = HalvingConfig(**OmegaConf.to_container(halving)) if halving is not None else HalvingConfig()
        halving.check()
        self.halving = halving if halving.rungs else None

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        (jobs,) = BasicSweeper.split_arguments(overrides, None)
        jobs = cross([list(job) for job in jobs], self.rows)
        size = max_batch_size or len(jobs) or 1
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]

    def sweep(self, arguments: list[str]) -> Any:
        if self.halving is None:
            return super().sweep(arguments)
        params = self._parse_config()
        params.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides(params)
        (jobs,) = self.split_arguments(parsed, None)
        grid = dict(enumerate(jobs))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        halving, record = self.halving, {"rungs": [], "cells": {}}

        def score(num: int, steps: int) -> float:
            """The job's validation figure at `steps`, from its metrics.json (never a test figure)."""
            path = sweep_dir / str(num) / "metrics.json"
            return value_at(json.loads(path.read_text()).get("val_curve") if path.is_file() else None, steps)

        def launch(nums: list[int], steps: int, overrides: dict[int, list[str]]) -> None:
            batch = [halving_job(overrides[n], steps, n) for n in nums]
            self.validate_batch_is_legal(batch)
            log.info("halving: %d jobs to %d steps", len(batch), steps)
            self.launcher.launch(batch, initial_job_idx=min(nums))  # failures: no figure, out
            record["rungs"].append({"steps": steps, "jobs": nums})

        by_cell = cells(grid, halving.cell)
        alive = {c: list(nums) for c, nums in by_cell.items()}
        for i, steps in enumerate(halving.rungs):
            launch(sorted(n for nums in alive.values() for n in nums), steps, grid)
            for c in by_cell:
                rung = halving_rung(alive[c], score, steps, halving.eta, i == len(halving.rungs) - 1,
                                    halving.min_kept)
                record["cells"].setdefault(" ".join(c), []).append(
                    {"steps": steps, "scores": {str(k): v for k, v in rung.scores.items()},
                     "survivors": rung.survivors})
                alive[c] = rung.survivors
        seeded = {}
        for (choice,) in alive.values():
            for seed in halving.seeds:
                seeded[len(grid) + len(seeded)] = [*(o for o in grid[choice] if key_of(o) != "seed"),
                                                   f"seed={seed}"]
        if seeded:
            launch(sorted(seeded), halving.rungs[-1], seeded)
        record["choices"] = {" ".join(c): nums[0] for c, nums in alive.items()}
        record["seed_jobs"] = {str(n): o for n, o in seeded.items()}
        write_json(sweep_dir / "halving.json", record)
        return []
