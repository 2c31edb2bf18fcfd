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
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it is in
# sys.modules, where dataclasses would look up string annotations.
from dataclasses import dataclass, field

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override

from gvae.rows import cross


@dataclass
class RowsSweeperConf:
    _target_: str = "hydra_plugins.gvae_plugins.rows_sweeper.RowsSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    rows: list[str] = field(default_factory=list)


ConfigStore.instance().store(group="hydra/sweeper", name="rows", node=RowsSweeperConf, provider="gvae")


class RowsSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None,
                 rows: list[str] | None = None):
        # BasicSweeper.__init__ names its own class through its module, which Hydra's plugin scan
        # executes a second time (making a new class that this one does not derive from): its
        # attributes are set here instead.
        self.overrides = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context = self.config = self.launcher = None
        self.rows = list(rows or [])

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        (jobs,) = BasicSweeper.split_arguments(overrides, None)
        jobs = cross([list(job) for job in jobs], self.rows)
        size = max_batch_size or len(jobs) or 1
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]
