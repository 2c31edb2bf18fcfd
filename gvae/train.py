"""Train a discrete-latent model: `gvae-train [overrides]`, `gvae-train -m ...` for sweeps.

The entry point and nothing else: importing it makes your own estimators ($GVAE_IMPORT) and gvae's
schemas and Hydra plugins known, the only module of gvae that acts at import. A run's lifecycle is
gvae/jobs.py's, its loop gvae/trainer.py's.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import DictConfig

from gvae.config import config_path, import_extensions, register_configs
from gvae.errors import GvaeError, Stopped
from gvae.jobs import Job, command_line_settings, sweep_job_folder, train_jobs
from gvae.run_folder import signals_raise_stopped
from hydra_plugins.gvae_plugins.packed_launcher import PackedLauncher
from hydra_plugins.gvae_plugins.rows_sweeper import RowsSweeper


def register_plugins() -> None:
    """gvae's Hydra plugins (hydra_plugins/gvae_plugins). Hydra finds plugins by listing the
    hydra_plugins namespace, which an editable install does not let it list: register them here."""
    Plugins.instance().register(RowsSweeper)
    Plugins.instance().register(PackedLauncher)


import_extensions()
register_configs()
register_plugins()


@hydra.main(version_base="1.3", config_path=config_path(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: train in Hydra's output folder; return the best validation negative
    ELBO, the figure a sweeper (Optuna, Ax) minimises: selection never sees the test set.

    The folder is locked for the run's lifetime and written only once the run is accepted
    (gvae/jobs.py); every failure ends in one message, a non-zero status and, once the run owns
    the folder, failed.json."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_num = hydra_cfg.job.num if multirun else None
    out_dir = Path(hydra_cfg.runtime.output_dir)
    if multirun:  # found by its settings, not its number
        out_dir = sweep_job_folder(out_dir, list(hydra_cfg.overrides.task))
    job = Job(out_dir, cfg, hydra_cfg, hydra_cfg.job.name, command_line_settings(cfg), job_num)
    with signals_raise_stopped(), ExitStack() as stack:
        try:
            if not job.accept(stack):  # finished before: nothing in its folder changes
                return job.opened.finished["val_nelbo_best"]
            stack.enter_context(job.logging())
            (result,) = train_jobs([job])
            if isinstance(result, GvaeError):
                raise result
            return job.completed(result)
        except (GvaeError, OSError, Stopped, KeyboardInterrupt) as e:
            job.end(e)  # logged while its log file is open


if __name__ == "__main__":
    main()
