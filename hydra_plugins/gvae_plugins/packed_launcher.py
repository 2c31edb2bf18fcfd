"""`hydra/launcher=packed`: a multirun's jobs trained in packs (gvae/packing.py), in this process.

    gvae-train -m hydra/launcher=packed experiment=paper_sweep
    gvae-train -m hydra/launcher=packed hydra.launcher.max_pack=16 seed=0,1,2,3 optim.lr=1e-3,3e-3

Every job is first prepared as Hydra's basic launcher prepares it (its folder, .hydra/config.yaml,
overrides.yaml, hydra.yaml), then the jobs that can share a pack (the same shapes, data, cadences
and optimizer class; seeds, learning rates, temperature schedules and float estimator options may
differ; gvae.packing.pack_key) and are at the same step are trained together, at most `max_pack`
at a time; the others in packs of their own. Each job writes what a separate run writes and
returns its best validation negative ELBO to the sweeper; a job that diverges fails alone.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it is in
# sys.modules, where dataclasses would look up string annotations.
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.gvae_plugins.packed_launcher.PackedLauncher"
    max_pack: int = 64  # runs trained together at most


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="gvae")


@dataclass
class Job:
    ret: JobReturn
    cfg: DictConfig
    out_dir: Path
    settings: dict  # what its command line set, for its hparams record


class PackedLauncher(Launcher):
    def __init__(self, max_pack: int = 64) -> None:
        if max_pack < 1:
            raise ValueError(f"hydra.launcher.max_pack={max_pack} is not allowed: must be >= 1")
        self.max_pack = max_pack
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from gvae.train import command_line_settings

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs in packs of at most {self.max_pack}")
        jobs: list[Job] = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            prepared: dict[str, Any] = {}

            def prepare(cfg: DictConfig, into: dict = prepared) -> None:
                """Hydra's own preparation of the job (folder, .hydra/); the training comes later."""
                out_dir = Path(HydraConfig.get().runtime.output_dir)
                into.update(out_dir=out_dir, settings=command_line_settings(cfg))

            ret = run_job(hydra_context=self.hydra_context, task_function=prepare, config=sweep_config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
                          configure_logging=False)
            jobs.append(Job(ret, ret.cfg, prepared["out_dir"], prepared["settings"]))
        for pack in plan_packs(jobs, self.max_pack):
            train_pack([jobs[i] for i in pack])
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [job.ret for job in jobs]


def plan_packs(jobs: list[Job], max_pack: int) -> list[list[int]]:
    """Groups of job indices that can train together (gvae.packing.pack_key, the same step), at
    most max_pack each, in the sweep's order. A job whose config is invalid is failed here."""
    from gvae.config import validate
    from gvae.errors import GvaeError
    from gvae.nets import Net
    from gvae.packing import pack_key

    groups: dict[Any, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        try:
            typed = validate(job.cfg)
        except GvaeError as e:
            fail(job, e, record=False)
            continue
        if Net(typed.model.net) is not Net.mlp:
            groups["alone", i].append(i)
            continue
        groups[pack_key(typed), resume_step(typed, job.out_dir)].append(i)
    return [group[k : k + max_pack] for group in groups.values() for k in range(0, len(group), max_pack)]


def resume_step(cfg: Any, out_dir: Path) -> Any:
    """The step a job starts from: its checkpoint's when resuming ("done" when it has finished)."""
    from gvae.checkpoint import load_checkpoint
    from gvae.train import finished_metrics

    if not cfg.train.resume:
        return 0
    if finished_metrics(out_dir, cfg.train.max_steps) is not None:
        return "done"
    path = out_dir / "checkpoints" / "last.pt"
    return load_checkpoint(path)["step"] if path.exists() else 0


def fail(job: Job, error: Exception, record: bool) -> None:
    from gvae.files import write_json

    log.error("%s: %s", job.out_dir, error)
    if record:  # a wrong command (bad value, another run's checkpoint) writes nothing but Hydra's files
        message = f"{type(error).__name__}: {error}"
        write_json(job.out_dir / "failed.json", {"status": "failed", "error": message})
    job.ret.return_value = error
    job.ret.status = JobStatus.FAILED


def train_pack(jobs: list[Job]) -> None:
    """Train these jobs together; each job's log lines also go to its own train.log."""
    from gvae.errors import CheckpointError, ConfigError, GvaeError, Interrupted, NonFiniteError
    from gvae.train import train_runs

    handlers = [logging.FileHandler(job.out_dir / "train.log") for job in jobs]
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(handler)
    try:
        results = train_runs([job.cfg for job in jobs], [job.out_dir for job in jobs],
                             [job.settings for job in jobs])
    except Interrupted as e:
        from gvae.files import write_json

        for job in jobs:
            write_json(job.out_dir / "failed.json", {"status": "interrupted", "error": str(e)})
        raise SystemExit(128 + e.signum) from None  # the machine is going away: the sweep stops too
    except GvaeError as e:
        for job in jobs:
            fail(job, e, record=not isinstance(e, (ConfigError, CheckpointError)))
        return
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    for job, result in zip(jobs, results, strict=True):
        if isinstance(result, NonFiniteError):  # its failed.json is written
            job.ret.return_value = result
            job.ret.status = JobStatus.FAILED
        else:
            (job.out_dir / "failed.json").unlink(missing_ok=True)  # a resumed run that failed before
            job.ret.return_value = result["val_nelbo_best"]
            job.ret.status = JobStatus.COMPLETED
