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
from contextlib import ExitStack
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
    folder: Any = None  # its locked gvae.run_folder.RunFolder
    opened: Any = None  # gvae.train.open_run's decision: (typed config, checkpoint, finished metrics)


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
        from gvae.run_folder import signals_raise_stopped
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
                """Hydra's own preparation of the job (its folder, its config); training comes later."""
                out_dir = Path(HydraConfig.get().runtime.output_dir)
                into.update(out_dir=out_dir, settings=command_line_settings(cfg))

            ret = run_job(hydra_context=self.hydra_context, task_function=prepare, config=sweep_config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
                          configure_logging=False)
            jobs.append(Job(ret, ret.cfg, prepared["out_dir"], prepared["settings"]))
        with ExitStack() as folders, signals_raise_stopped():
            ready = [job for job in jobs if accept(job, folders)]
            for pack in plan_packs(ready, self.max_pack):
                train_pack([ready[i] for i in pack])
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [job.ret for job in jobs]


def accept(job: Job, folders: ExitStack) -> bool:
    """Lock the job's folder and decide, writing nothing, whether it may run there (gvae.train.open_run);
    then record it as gvae-train records a run. False for a refused job (failed) or a finished one."""
    from gvae.errors import GvaeError
    from gvae.run_folder import RunFolder
    from gvae.train import open_run

    try:
        job.folder = folders.enter_context(RunFolder(job.out_dir))
        job.opened = open_run(job.cfg, job.out_dir)
    except GvaeError as e:
        fail(job, e)
        return False
    done = job.opened[2]
    if done is not None:  # finished before (train.resume=true): nothing to train or write
        job.ret.return_value, job.ret.status = done["val_nelbo_best"], JobStatus.COMPLETED
        return False
    job.folder.record(job.cfg, job.ret.hydra_cfg.hydra, log_name=None)  # train_pack logs per pack
    return True


def plan_packs(jobs: list[Job], max_pack: int) -> list[list[int]]:
    """Groups of job indices that can train together (gvae.packing.pack_key, the same step), at
    most max_pack each, in the sweep's order."""
    from gvae.nets import Net
    from gvae.packing import pack_key

    groups: dict[Any, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        typed, saved, _ = job.opened
        if Net(typed.model.net) is not Net.mlp:
            groups["alone", i].append(i)
            continue
        groups[pack_key(typed), saved["step"] if saved else 0].append(i)
    return [group[k : k + max_pack] for group in groups.values() for k in range(0, len(group), max_pack)]


def fail(job: Job, error: BaseException) -> None:
    """The job's one-line message, its failed.json once it owns its folder, and Hydra's record."""
    from gvae.errors import JobFailed
    from gvae.run_folder import describe_failure, write_failure

    status, message, _ = describe_failure(error, job.out_dir)
    log.error("%s: %s", job.out_dir, message)
    if job.folder is not None and job.folder.recorded:
        write_failure(job.out_dir, status, message, error)
    number = job.ret.hydra_cfg.hydra.job.num
    job.ret.return_value = JobFailed(f"job {number} ({job.out_dir}) failed: {message}")
    job.ret.status = JobStatus.FAILED


def train_pack(jobs: list[Job]) -> None:
    """Train these jobs together; each job's log lines (the pack's) also go to its own train.log."""
    from gvae.errors import GvaeError, Interrupted, NonFiniteError, Stopped
    from gvae.run_folder import describe_failure, log_file
    from gvae.train import train_runs

    root = logging.getLogger()
    handlers = [log_file(job.out_dir / f"{job.ret.hydra_cfg.hydra.job.name}.log") for job in jobs]
    for handler in handlers:
        root.addHandler(handler)
    try:
        results = train_runs([job.cfg for job in jobs], [job.out_dir for job in jobs],
                             [job.settings for job in jobs], [job.opened for job in jobs])
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, NonFiniteError):  # its failed.json is written
                fail(job, result)
            else:
                (job.out_dir / "failed.json").unlink(missing_ok=True)  # a resumed run that failed before
                job.ret.return_value = result["val_nelbo_best"]
                job.ret.status = JobStatus.COMPLETED
    except (Interrupted, Stopped, KeyboardInterrupt) as e:
        for job in jobs:
            fail(job, e)
        raise SystemExit(describe_failure(e, jobs[0].out_dir)[2]) from None  # the sweep stops too
    except (GvaeError, OSError) as e:
        for job in jobs:
            fail(job, e)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
