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

On a CPU the packs train at once in `workers` processes (gvae/pack_workers.py), one per core by
default, each with its share of the threads; a pack larger than it need be is split so that every
worker has one. On a GPU (or with `hydra.launcher.workers=1`) they train one after another in this
process.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module before it is in
# sys.modules, where dataclasses would look up string annotations.
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
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
    # Packs trained at once, each in a worker process with its share of the threads; null: one per
    # CPU core when the runs are on the CPU, 1 (this process) on a GPU.
    workers: int | None = None


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="gvae")


class PackedLauncher(Launcher):
    def __init__(self, max_pack: int = 64, workers: int | None = None) -> None:
        if max_pack < 1:
            raise ValueError(f"hydra.launcher.max_pack={max_pack} is not allowed: must be >= 1")
        if workers is not None and workers < 1:
            raise ValueError(f"hydra.launcher.workers={workers} is not allowed: must be >= 1 (or null: "
                             "one per CPU core on the CPU, 1 on a GPU)")
        self.max_pack, self.workers = max_pack, workers
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
            workers = self.workers or default_workers([job for job, _ in ready])
            packs = [[ready[i] for i in pack]
                     for pack in plan_packs([job for job, _ in ready], self.max_pack, workers)]
            if workers > 1 and len(packs) > 1:
                train_in_workers(packs, workers)
            else:
                for pack in packs:
                    train_pack(pack)
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


def plan_packs(jobs: "list[Job]", max_pack: int, workers: int = 1) -> list[list[int]]:
    """Groups of job indices that can train together (gvae.engine.pack_key, the same step), at most
    max_pack each, in the sweep's order; the largest split in two while there are fewer packs than
    workers, so that each worker has a pack."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        if Net(job.opened.config.model.net) is not Net.mlp:
            groups["alone", i].append(i)
            continue
        groups[pack_key(job.opened.config), job.opened.step].append(i)
    packs = [group[k : k + max_pack] for group in groups.values() for k in range(0, len(group), max_pack)]
    while len(packs) < workers and (largest := max(packs, key=len, default=[])) and len(largest) > 1:
        at = packs.index(largest)
        packs[at : at + 1] = [largest[: (len(largest) + 1) // 2], largest[(len(largest) + 1) // 2 :]]
    return packs


def default_workers(jobs: "list[Job]") -> int:
    """One worker per CPU core when every run is on the CPU; 1 (this process) when any is on a GPU,
    where one process keeps the device busy."""
    from gvae.config import resolve_device

    if any(resolve_device(job.opened.config.device).type != "cpu" for job in jobs):
        return 1
    return len(os.sched_getaffinity(0))


def fail(job: "Job", ret: JobReturn, error: BaseException) -> None:
    """The job's message and failed.json (gvae.jobs.Job.failed), and Hydra's record."""
    _, message, _ = job.failed(error)
    ret.return_value, ret.status = job.job_failed(message), JobStatus.FAILED


def train_in_workers(packs: "list[list[tuple[Job, JobReturn]]]", workers: int) -> None:
    """Train the packs at once in `workers` processes (gvae/pack_workers.py), this process's threads
    shared out among them; each job's outcome recorded as its pack ends. An interrupt is forwarded
    to the workers (the packs in training checkpoint), then every job not finished fails with it
    and the sweep stops."""
    from gvae.pack_workers import PackTask, PackWorkers

    count = min(workers, len(packs))
    threads = max(1, torch.get_num_threads() // count)
    log.info(f"Training {len(packs)} packs in {count} worker processes of {threads} thread(s) each")
    tasks = [PackTask(k, [job.opened for job, _ in pack], [job.settings for job, _ in pack],
                      [job.out_dir / f"{job.log_name}.log" for job, _ in pack])
             for k, pack in enumerate(packs)]
    stopped: BaseException | None = None
    with PackWorkers(count, threads) as pool, pool.forwarding_signals() as received:
        for key, outcome in pool.train(tasks):
            record_pack(packs[key], outcome)
            if isinstance(outcome, (Interrupted, Stopped)):
                stopped = stopped or outcome
    if received and stopped is None:  # a signal after the last pack ended: the sweep stops as usual
        stopped = Stopped(received[0])
    if stopped is not None:
        raise SystemExit(describe_failure(stopped, packs[0][0][0].out_dir)[2])


def record_pack(pack: "list[tuple[Job, JobReturn]]", outcome: "list[Any] | Exception") -> None:
    """A pack's outcome recorded job by job: the error that ended the pack fails each of its jobs (one
    message, failed.json); a run that diverged fails alone (recorded as it diverged); the others
    return their best validation figure to the sweeper."""
    results = [outcome] * len(pack) if isinstance(outcome, BaseException) else outcome
    for (job, ret), result in zip(pack, results, strict=True):
        with job.logging():
            if isinstance(result, NonFiniteError):
                job.recorded_failure = result  # its message and failed.json were written as it diverged
            if isinstance(result, BaseException):
                fail(job, ret, result)
            else:
                ret.return_value, ret.status = job.completed(result), JobStatus.COMPLETED


def train_pack(pack: "list[tuple[Job, JobReturn]]") -> None:
    """Train these jobs together in this process; each job's log lines (the pack's) also go to its
    own log file. An interrupt fails every job of the pack and stops the sweep."""
    with ExitStack() as logs:
        for job, _ in pack:
            logs.enter_context(job.logging())
        try:
            outcome = jobs().train_jobs([job for job, _ in pack])
        except (Interrupted, Stopped, KeyboardInterrupt) as e:
            for job, ret in pack:
                fail(job, ret, e)
            raise SystemExit(describe_failure(e, pack[0][0].out_dir)[2]) from None  # the sweep stops too
        except Exception as e:  # noqa: BLE001  (gvae's own or not: this pack fails, the later ones go on)
            outcome = e
    record_pack(pack, outcome)
