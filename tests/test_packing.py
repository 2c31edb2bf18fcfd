"""gvae/packing.py, gvae/engine.py and the packed launcher: packed runs train exactly like separate
ones (every registered estimator, both tasks), write what separate runs write, resume alone, and fail
alone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from gvae.checkpoint import load_checkpoint
from gvae.config import validate
from gvae.engine import build_engine, check_packable, pack_key
from gvae.errors import NonFiniteError
from gvae.estimators import ESTIMATORS
from gvae.jobs import train_runs
from tests.conftest import SYNTHETIC, compose_config, estimator_overrides, gvae_train

# Three runs that differ in all a pack allows: seed, learning rate, temperature schedule; the
# first runs at the smallest learning rate, the pack's own.
RUNS = [["seed=0", "optim.lr=1e-3"],
        ["seed=1", "optim.lr=3e-3", "schedule.rate=0.01", "schedule.every=5"],
        ["seed=2", "optim.lr=2e-3"]]
SHORT = [*SYNTHETIC, "train.max_steps=30", "train.eval_every=15", "train.ckpt_every=30", "eval.images=false"]


def compare(packed_dir: Path, single_dir: Path, exact: bool, atol: float = 1e-5) -> None:
    """The packed run's final parameters, estimator state and metrics against the separate run's."""
    packed, single = load_checkpoint(packed_dir / "checkpoints" / "last.pt"), load_checkpoint(
        single_dir / "checkpoints" / "last.pt")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (packed_dir, single_dir))
    for part in ("model", "estimator"):
        for key, value in single[part].items():
            if exact:
                assert torch.equal(packed[part][key], value), (part, key)
            else:  # rounding only (a rescaled step, or a resumed pack's drift; see the callers)
                torch.testing.assert_close(packed[part][key].float(), value.float(), rtol=1e-4, atol=atol)
    for key in ("val_nelbo", "val_nelbo_best", "test_nelbo", "test_bound"):
        assert a[key] == b[key] if exact else a[key] == pytest.approx(b[key], abs=1e-3), key
    assert [p[0] for p in a["val_curve"]] == [p[0] for p in b["val_curve"]]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gumbel_softmax", "score_function"])
def test_packed_runs_train_like_separate_runs(estimator, tmp_path):
    """A gradient-free-baseline estimator and a score-function one (moving baselines, with a decay
    of its own in each run). The run at the pack's learning rate matches its separate run exactly;
    the others to rounding (rtol 1e-4, atol 1e-5 on parameters, 1e-3 nats on figures): their step
    is the pack's rescaled by lr_s / lr_0, which rounds differently from lr_s times the direction."""
    options = (["estimator.decay=0.8"], ["estimator.decay=0.6"], ["estimator.decay=0.9"])
    runs = [[*SHORT, f"estimator={estimator}", *run, *(options[i] if estimator == "score_function" else [])]
            for i, run in enumerate(RUNS)]
    packed = train_runs([compose_config(r) for r in runs], [tmp_path / f"packed{i}" for i in range(3)])
    for i, run in enumerate(runs):
        (single,) = train_runs([compose_config(run)], [tmp_path / f"single{i}"])
        assert packed[i]["status"] == single["status"] == "complete"
        compare(tmp_path / f"packed{i}", tmp_path / f"single{i}", exact=i == 0)


LATENTS = {"categorical": ["model.num_vars=3", "model.num_classes=4"],
           "bernoulli": ["model=bernoulli", "model.num_vars=6"]}
# Every registered estimator on every latent it is defined for, in both tasks: a new estimator is
# covered without an edit here.
EVERY = [(task, name, latent, []) for task in ("vae", "sbn") for name in sorted(ESTIMATORS)
         for latent in LATENTS if latent in ESTIMATORS[name].config.latents]
# Options that change what the step computes: a learned control variate, the K-sample objective.
EVERY += [("vae", "rebar", "categorical", ["estimator.learn=true"]),
          ("sbn", "rebar", "bernoulli", ["estimator.learn=true"]),
          ("vae", "gumbel_softmax", "categorical", ["task.objective=iwae", "task.samples=3"]),
          ("sbn", "st_gumbel_softmax", "bernoulli", ["task.objective=iwae", "task.samples=3"])]


def _engine_runs(overrides: list[list[str]], steps: int = 12):
    """The runs' parts after `steps` steps in one engine (alone or packed), the temperature moved
    by each run's own amount halfway."""
    cfgs = [validate(compose_config([*SYNTHETIC, "model.hidden=[16]", *o])) for o in overrides]
    engine = build_engine(cfgs, [None] * len(cfgs))
    for step in range(steps):
        if step == steps // 2:
            engine.set_tau([c.schedule.tau0 * 0.6 for c in cfgs])
        engine.train_step()
    engine.sync_to_runs()
    return engine.runs


@pytest.mark.parametrize(("task", "name", "latent", "options"), EVERY)
def test_every_estimator_trains_packed_as_it_trains_alone(task, name, latent, options):
    """Two runs that differ in seed, learning rate, starting temperature (and a float option of the
    estimator when it has one) packed, against each alone, after 12 steps: parameters, estimator
    state and optimizer state agree to rounding. Not always to the bit: a batched product's
    gradient rounds a few elements differently from a plain one (measured on this CPU in five
    combinations, the run at the pack's learning rate: 0 to 60 parameter elements off by at most
    1.5e-8 after 12 steps, none after 2); the other run's update is the pack's rescaled by
    lr_s / lr_0, which rounds too. A wrong batch, noise draw or temperature moves parameters by
    about the learning rate (1e-3) instead."""
    floats = [f for f, v in vars(ESTIMATORS[name].config()).items() if isinstance(v, float)]
    runs = [["seed=0", "optim.lr=1e-3"], ["seed=1", "optim.lr=2e-3", "schedule.tau0=0.8",
                                          *([f"estimator.{floats[0]}=0.7"] if floats else [])]]
    # Adam turns a gradient element of rounding size into a step of the learning rate's size, and the
    # lr_s / lr_0 rescaling's rounding reaches such elements of these two within a few steps (measured:
    # 2e-4 after 4 steps); with SGD they agree to rounding like the rest.
    sgd = ["optim=sgd"] if name in ("relax", "vimco") else []
    runs = [[f"task={task}", *estimator_overrides(name), *LATENTS[latent], *options, *sgd, *run]
            for run in runs]
    packed = _engine_runs(runs)
    for i, run in enumerate(runs):
        (alone,) = _engine_runs([run])
        pairs = [*zip(packed[i].model.state_dict().values(), alone.model.state_dict().values(), strict=True),
                 *zip(packed[i].estimator.state_dict().values(), alone.estimator.state_dict().values(),
                      strict=True)]
        for a, b in pairs:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-6)
        for p, q in zip(packed[i].params, alone.params, strict=True):
            a, b = packed[i].optimizer.state[p], alone.optimizer.state[q]
            assert a.keys() == b.keys()
            for k in b:
                # plus a floor: a learned control variate's scalars (eta, log lambda) have gradients that
                # are sums of cancelling second-order terms, so the lr_s / lr_0 rescaling's rounding
                # reaches their momenta relatively at up to 1e-3 in 12 steps (1e-6 for the run at lr_0)
                assert (a[k] - b[k]).float().norm() <= 1e-4 * b[k].float().norm() + 1e-5, k


def test_what_may_differ_in_a_pack_and_what_may_not():
    base = validate(compose_config([*SHORT, "estimator=score_function"]))
    same = [validate(compose_config([*SHORT, "estimator=score_function", *run, "estimator.decay=0.5"]))
            for run in RUNS]
    assert {pack_key(c) for c in [base, *same]} == {pack_key(base)}
    for other in (["model.hidden=[16]"], ["train.max_steps=31"], ["optim=sgd"], ["estimator=muprop"],
                  ["data.split_seed=1"], ["optim.betas=[0.5,0.9]"]):
        cfg = validate(compose_config([*SHORT, "estimator=score_function", *other]))
        assert pack_key(cfg) != pack_key(base), other
        with pytest.raises(ValueError, match="cannot share a pack"):
            check_packable([base, cfg])
    with pytest.raises(ValueError, match="model.net=mlp"):
        check_packable([validate(compose_config([*SHORT, "model.net=conv"]))] * 2)


@pytest.mark.slow
def test_a_diverging_run_fails_alone(tmp_path):
    runs = [[*SHORT, "seed=0", "optim.lr=1e-3"], [*SHORT, "seed=1", "optim.lr=1e30"], [*SHORT, "seed=2"]]
    results = train_runs([compose_config(r) for r in runs], [tmp_path / str(i) for i in range(3)])
    assert isinstance(results[1], NonFiniteError)
    assert json.loads((tmp_path / "1" / "failed.json").read_text())["error"].startswith("NonFiniteError")
    assert not (tmp_path / "1" / "metrics.json").exists()
    for i in (0, 2):
        assert results[i]["status"] == "complete" and not (tmp_path / str(i) / "failed.json").exists()


SWEEP = ["-m", "hydra/launcher=packed", *SHORT, "seed=0,1", "optim.lr=1e-3,3e-3"]


@pytest.mark.slow
def test_the_packed_launcher_writes_each_jobs_folder_and_packs_compatible_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    result = gvae_train([*SWEEP, "model.hidden=[32],[16]", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Launching 8 jobs in packs of at most 64" in result.stdout
    assert result.stdout.count("runs packed") == 2  # one pack per network size
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        assert {".hydra", "checkpoints", "metrics.json", "train.log"} <= {p.name for p in job.iterdir()}
        assert list(job.glob("events.out.tfevents.*"))
        assert json.loads((job / "metrics.json").read_text())["status"] == "complete"
        assert (job / ".hydra" / "overrides.yaml").read_text().count("model.hidden") == 1


@pytest.mark.slow
def test_an_unexpected_error_in_one_pack_fails_its_jobs_and_the_later_packs_train(tmp_path, monkeypatch):
    """An error that is not one of gvae's (a bug, an estimator of the user's) in one pack: its jobs fail
    with one message naming it and failed.json, and the packs after it train as usual."""
    import gvae.jobs
    import gvae.train

    build = gvae.jobs.build_engine

    def failing_build(cfgs, *args, **kwargs):
        if cfgs[0].model.hidden == [16]:
            raise ZeroDivisionError("a bug")
        return build(cfgs, *args, **kwargs)

    monkeypatch.setattr(gvae.jobs, "build_engine", failing_build)
    sweep = tmp_path / "sweep"
    # In this process (workers=1): the patch does not reach worker processes (the worker's own path
    # is test_a_workers_pack_error_comes_back_whole_or_named).
    args = [*SWEEP, "model.hidden=[16],[32]", "hydra.launcher.workers=1", f"hydra.sweep.dir={sweep}"]
    monkeypatch.setattr(sys, "argv", ["gvae-train", *args])
    with contextlib.suppress(SystemExit):
        gvae.train.main()
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    hidden = {job: "[16]" in (job / ".hydra" / "overrides.yaml").read_text() for job in jobs}
    assert sum(hidden.values()) == 4
    for job in jobs:
        if hidden[job]:
            error = json.loads((job / "failed.json").read_text())["error"]
            assert "unexpected ZeroDivisionError: a bug" in error and not (job / "metrics.json").exists()
        else:
            assert json.loads((job / "metrics.json").read_text())["status"] == "complete"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_packed_sweep_resumes_packed_or_alone_to_the_same_numbers(tmp_path, workers):
    """Killed mid-sweep, then resumed: job 0 alone, the others packed. Each ends where the
    uninterrupted sweep ended, to rounding. Mostly to the bit; but in one of eight runs on the 2-core
    VM, and once in CI, a resumed pack's last bits drifted from the uninterrupted sweep's somewhere
    mid-run (not at the resume: its figures matched exactly for a few evaluations first). In-process
    repeats never showed it, whatever the kill step, thread count or hash seed. Training amplifies
    such a drift, so the run is short (about 130 steps after the kill) and the tolerance,
    1e-4 on parameters and 1e-3 nats on figures, sits far below a wrong resume's error: one
    missed, repeated or reordered step moves most weights by about the learning rate (1e-3).
    With two workers the four jobs train as two packs in two processes ({0, 1} and {2, 3}); the
    signal reaches the sweep's process alone, which forwards it to both."""
    max_steps = 150
    steps = f"train.max_steps={max_steps}"
    straight = tmp_path / "straight"
    launcher = f"hydra.launcher.workers={workers}"
    result = gvae_train([*SWEEP, steps, launcher, f"hydra.sweep.dir={straight}"], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]
    sweep = tmp_path / "sweep"
    # Logged every step (no figure changes), which slows this tiny model's steps enough that a pack
    # seen training is still training when the forwarded signal reaches it.
    args = [*SWEEP, steps, launcher, "train.ckpt_every=100000", "train.log_every=1",
            f"hydra.sweep.dir={sweep}"]
    proc = gvae_train(args, tmp_path, wait=False)
    logs, deadline = [sweep / str(i) / "train.log" for i in range(0, 4, 4 // workers)], time.monotonic() + 200
    while not all(log.is_file() and "val nelbo" in log.read_text() for log in logs):  # every pack trains
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    saved = [load_checkpoint(sweep / str(i) / "checkpoints" / "last.pt")["step"] for i in range(4)]
    packs = [saved[k : k + 4 // workers] for k in range(0, 4, 4 // workers)]
    assert all(len(set(pack)) == 1 for pack in packs), saved  # a pack's runs saved at the same step
    # Every pack stopped mid-run; with two workers on a busy machine one pack may have finished
    # before the other started training, and then the other alone was stopped.
    stopped = [pack[0] for pack in packs if pack[0] < max_steps]
    assert stopped and all(step > 0 for step in stopped), saved
    assert workers == 2 or len(stopped) == len(packs), saved
    # Job 0 (seed 0, lr 1e-3, the pack's learning rate) resumed alone, by a plain gvae-train, then
    # the three others resumed packed.
    job = sweep / "0"
    alone = [line[2:] for line in (job / ".hydra" / "overrides.yaml").read_text().splitlines()
             if line.startswith("- ")]
    assert gvae_train([*alone, "train.resume=true", f"hydra.run.dir={job}"], tmp_path).returncode == 0
    assert gvae_train([*args, "train.resume=true"], tmp_path).returncode == 0
    for i in range(4):
        compare(sweep / str(i), straight / str(i), exact=False, atol=1e-4)


@pytest.mark.slow
def test_packs_train_in_worker_processes_to_the_numbers_of_one_process(tmp_path):
    """hydra.launcher.workers=2: the four jobs split into two packs, trained at once in two
    single-thread processes, end where one pack of four in this process ends (to rounding: packs of
    other sizes batch their products differently)."""
    dirs = {}
    for workers in (1, 2):
        dirs[workers] = tmp_path / f"workers{workers}"
        result = gvae_train([*SWEEP, f"hydra.launcher.workers={workers}", f"hydra.sweep.dir={dirs[workers]}"],
                            tmp_path)
        assert result.returncode == 0, result.stdout[-3000:]
        packs = "Training 2 packs in 2 worker processes of 1 thread(s) each"
        assert (packs in result.stdout) == (workers == 2), result.stdout[-3000:]
    for i in range(4):
        compare(dirs[2] / str(i), dirs[1] / str(i), exact=False)
        log = (dirs[2] / str(i) / "train.log").read_text()
        assert "2 runs packed" in log and "done in" in log  # each job's own log, written by its worker


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_packs_jobs_and_the_other_pack_finishes(tmp_path):
    """A worker process killed (SIGKILL: the out-of-memory killer's) while it trains: its pack's jobs
    fail with one message naming how it ended, the other worker's pack completes, and a resumed sweep
    trains the lost pack from its checkpoints."""
    sweep = tmp_path / "sweep"
    args = [*SWEEP, "train.max_steps=600", "train.ckpt_every=15", "hydra.launcher.workers=2",
            f"hydra.sweep.dir={sweep}"]
    proc = gvae_train(args, tmp_path, wait=False)
    log, deadline = sweep / "2" / "train.log", time.monotonic() + 200
    while not (log.is_file() and "step 30 " in log.read_text()):
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    events = next((sweep / "2").glob("events.out.tfevents.*")).name  # ...tfevents.TIME.HOST.PID.N
    trainer = int(events.rsplit(".", 2)[1])  # the worker writing pack {2, 3}'s events
    assert trainer != proc.pid
    os.kill(trainer, signal.SIGKILL)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-2000:]  # after the other pack finished
    for i in (2, 3):
        error = json.loads((sweep / str(i) / "failed.json").read_text())["error"]
        lost = "worker process training this pack ended with exit code -9 (killed by SIGKILL)"
        assert lost in error, out[-2000:]
        assert not (sweep / str(i) / "metrics.json").exists()
    for i in (0, 1):
        assert json.loads((sweep / str(i) / "metrics.json").read_text())["status"] == "complete", out[-2000:]
    resumed = gvae_train([*args, "train.resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert "resumed from" in (sweep / "2" / "train.log").read_text()
    for i in (2, 3):
        assert json.loads((sweep / str(i) / "metrics.json").read_text())["status"] == "complete"


def test_a_workers_pack_error_comes_back_whole_or_named(monkeypatch, tmp_path):
    """What a worker returns for a pack that failed: the error itself when it crosses a process
    boundary (then the launcher's message names its type, as for a pack in its own process), else a
    RuntimeError naming its type and message."""
    import gvae.jobs
    from gvae.pack_workers import PackTask, train_task

    class Unpicklable(Exception):
        def __init__(self, message, handle):
            super().__init__(message)
            self.handle = handle

    def raises(error):
        def train_opened(*args, **kwargs):
            raise error
        return train_opened

    task = PackTask(0, [], [], [tmp_path / "train.log"])
    monkeypatch.setattr(gvae.jobs, "train_opened", raises(ZeroDivisionError("a bug")))
    error = train_task(task)
    assert type(error) is ZeroDivisionError and str(error) == "a bug"
    monkeypatch.setattr(gvae.jobs, "train_opened", raises(Unpicklable("no pickle", lambda: None)))
    error = train_task(task)
    assert type(error) is RuntimeError and str(error) == "Unpicklable: no pickle"
