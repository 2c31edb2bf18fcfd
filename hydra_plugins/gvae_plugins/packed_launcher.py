"""`hydra/launcher=packed`: a multirun's jobs trained in packs (gvae/packing.py), in this process.

    gvae-train -m hydra/launcher=packed experiment=paper_sweep
    gvae-train -m hydra/launcher=packed hydra.launcher.max_pack=16 seed=0,1,2,3 optim.lr=1e-3,3e-3

A thin adapter between Hydra and gvae/jobs.py: every job is first prepared as Hydra's basic launcher
prepares it (its config, its folder's name), then goes through gvae's job lifecycle as a gvae-train
run does (locked, accepted, recorded), and the jobs that can share a pack (gvae.engine.pack_key: the
same shapes, data, cadences and optimizer class; seeds, learning rates, temperature schedules and
float estimator options may differ) and are at the same step are trained together, at most
`max_pack` at a time; the others in packs of their own. Each job writes what a separate run writes
and returns its best validation negative ELBO to the sweeper; a job that diverges fails alone.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it is in
# sys.modules, where dataclasses would look up string annotations.
import logging
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from gvae.engine import pack_key
from gvae.errors import Interrupted, NonFiniteError, Stopped
from gvae.nets import Net
from gvae.run_folder import describe_failure, signals_raise_stopped, sweep_job_folder

if TYPE_CHECKING:
    from gvae.jobs import Job

log = logging.getLogger(__name__)


def jobs():
    """gvae.jobs, imported when a sweep launches: it brings the trainer (TensorBoard), which composing
    a config (gvae-train --help, --cfg) does not need."""
    import gvae.jobs

    return gvae.jobs


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.gvae_plugins.packed_launcher.PackedLauncher"
    max_pack: int = 64  # runs trained together at most


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="gvae")


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
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs in packs of at most {self.max_pack}")
        prepared = [self.prepare(idx, overrides)
                    for idx, overrides in enumerate(job_overrides, initial_job_idx)]
        with ExitStack() as folders, signals_raise_stopped():
            ready = [(job, ret) for job, ret in prepared if accept(job, ret, folders)]
            for pack in plan_packs([job for job, _ in ready], self.max_pack):
                train_pack([ready[i] for i in pack])
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [ret for _, ret in prepared]

    def prepare(self, idx: int, overrides: Sequence[str]) -> "tuple[Job, JobReturn]":
        """The job as Hydra's basic launcher prepares it (its config, its folder's name); training
        comes later."""
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        found: dict[str, Any] = {}

        def prepare(cfg: DictConfig) -> None:
            hydra_cfg = HydraConfig.get()  # the job's folder found by its settings, not its number
            found.update(out_dir=sweep_job_folder(hydra_cfg),
                         settings=jobs().command_line_settings(cfg))

        ret = run_job(hydra_context=self.hydra_context, task_function=prepare, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
                      configure_logging=False)
        hydra_cfg = ret.hydra_cfg.hydra
        job = jobs().Job(found["out_dir"], ret.cfg, hydra_cfg, hydra_cfg.job.name, found["settings"], idx,
                  label=f"{found['out_dir']}: ")
        return job, ret


def accept(job: "Job", ret: JobReturn, folders: ExitStack) -> bool:
    """The job's folder locked and its run accepted and recorded (gvae.jobs.Job.accept); False for a
    refused job (failed) or a finished one (completed, nothing written)."""
    try:
        if job.accept(folders):
            return True
    except Exception as e:  # noqa: BLE001  (gvae's own or not: this job fails, the others go on)
        fail(job, ret, e)
        return False
    ret.return_value, ret.status = job.opened.finished["val_nelbo_best"], JobStatus.COMPLETED
    return False


def plan_packs(jobs: "list[Job]", max_pack: int) -> list[list[int]]:
    """Groups of job indices that can train together (gvae.engine.pack_key, the same step), at most
    max_pack each, in the sweep's order."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        if Net(job.opened.config.model.net) is not Net.mlp:
            groups["alone", i].append(i)
            continue
        groups[pack_key(job.opened.config), job.opened.step].append(i)
    return [group[k : k + max_pack] for group in groups.values() for k in range(0, len(group), max_pack)]


def fail(job: "Job", ret: JobReturn, error: BaseException) -> None:
    """The job's message and failed.json (gvae.jobs.Job.failed), and Hydra's record."""
    _, message, _ = job.failed(error)
    ret.return_value, ret.status = job.job_failed(message), JobStatus.FAILED


def train_pack(pack: "list[tuple[Job, JobReturn]]") -> None:
    """Train these jobs together; each job's log lines (the pack's) also go to its own log file."""
    with ExitStack() as logs:
        for job, _ in pack:
            logs.enter_context(job.logging())
        try:
            results = jobs().train_jobs([job for job, _ in pack])
        except (Interrupted, Stopped, KeyboardInterrupt) as e:
            for job, ret in pack:
                fail(job, ret, e)
            raise SystemExit(describe_failure(e, pack[0][0].out_dir)[2]) from None  # the sweep stops too
        except Exception as e:  # noqa: BLE001  (gvae's own or not: this pack fails, the later ones go on)
            for job, ret in pack:
                fail(job, ret, e)
            return
        for (job, ret), result in zip(pack, results, strict=True):
            if isinstance(result, NonFiniteError):  # recorded as it diverged
                fail(job, ret, result)
            else:
                ret.return_value, ret.status = job.completed(result), JobStatus.COMPLETED
