"""Train a discrete-latent model: `gvae-train [overrides]`, `gvae-train -m ...` for sweeps.

The entry point and nothing else: importing it makes your own estimators ($GVAE_IMPORT) and gvae's
schemas and Hydra plugins known, the only module of gvae that acts at import. A run's lifecycle is
gvae/jobs.py's, its loop gvae/trainer.py's: imported once a run's config is valid, so that `--help`,
`--cfg` and a config error cost about an `import torch` (scripts/startup_time.py measures them).
"""

from __future__ import annotations

import logging
import string
import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gvae.config import config_path, hydra_initialized, import_extensions, register_configs, validate
from gvae.errors import ConfigError, GvaeError, Stopped
from gvae.run_folder import JobFailed, remove_if_empty, signals_raise_stopped, sweep_job_folder
from hydra_plugins.gvae_plugins.packed_launcher import PackedLauncher
from hydra_plugins.gvae_plugins.rows_sweeper import RowsSweeper

log = logging.getLogger(__name__)


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
        out_dir = sweep_job_folder(hydra_cfg)
    try:
        validate(cfg)  # before the trainer is imported: a bad value is refused in start-up time
    except ConfigError as e:
        remove_if_empty(out_dir)  # made by Hydra; the run never owned it
        log.error("%s", e)
        if multirun:
            raise JobFailed(f"job {job_num} ({out_dir}) failed: {e}") from None
        raise SystemExit(1) from None
    from gvae.jobs import Job, command_line_settings, train_jobs  # the trainer: only to train

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


def print_help(overrides: list[str]) -> None:
    """`gvae-train --help` as Hydra prints it (configs/config.yaml's hydra.help, the config below it),
    without Hydra's listing of every config group's options, which it makes whether or not the template
    shows them (composing the config once per group: most of the help's start-up time) and ours does not
    (its groups come from ${gvae_config_groups:})."""
    with hydra_initialized():
        cfg = hydra.compose(config_name="config", overrides=overrides, return_hydra_config=True)
    template = cfg.hydra.help.template  # resolved on access, as Hydra's is
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    print(string.Template(template).substitute(CONFIG=OmegaConf.to_yaml(job), FLAGS_HELP="",
                                               HYDRA_CONFIG_GROUPS="", APP_CONFIG_GROUPS=""))


def cli() -> None:
    """gvae-train: `--help` (with overrides, if any) printed quickly; everything else through Hydra."""
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        flags = [a for a in args if a.startswith("-")]
        if set(flags) <= {"--help", "-h"}:
            print_help([a for a in args if not a.startswith("-")])
            return
    main()


if __name__ == "__main__":
    cli()
