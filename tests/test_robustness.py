"""Robust runs: resume after a kill, data faults, numerical faults, safe checkpoints, sweep restarts."""

from __future__ import annotations

import dataclasses
import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gvae.train
from gvae.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from gvae.data import IDX_FILES, prepare_mnist
from gvae.errors import CheckpointError, DataError, Interrupted, NonFiniteError
from gvae.train import deferred_signals, train
from tests.conftest import TINY, compose_config

# TINY with all that a resume must restore: dynamic binarization (the global RNG), a learned
# prior, an estimator with moving baselines (buffers), tau changing every 10 steps; and a small
# validation set to keep evaluations quick.
RESUMABLE = [*TINY, "data.binarization=dynamic", "model.prior=learned", "estimator=score_function",
             "schedule.every=10", "schedule.rate=0.02", "data.num_val=1000"]
STATE_KEYS = ("model", "estimator", "optimizer", "sampler", "rng")


def with_step_hook(monkeypatch: pytest.MonkeyPatch, hook) -> None:
    """Make train() call hook(call_number, run) after each training step."""
    build = gvae.train.build_training

    def build_with_hook(cfg, state=None):
        run = build(cfg, state)
        calls = 0

        def step(images, tau):
            nonlocal calls
            parts = run.step(images, tau)
            calls += 1
            hook(calls, run)
            return parts

        return dataclasses.replace(run, step=step)

    monkeypatch.setattr(gvae.train, "build_training", build_with_hook)


def assert_same_state(a: object, b: object, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are exactly equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


RESULTS = ("status", "step", "val_nelbo_best", "test_nelbo", "test_bound")


@pytest.fixture(scope="module")
def straight_run(mnist_root, tmp_path_factory) -> tuple[dict, dict]:
    """(metrics, final checkpoint) of an uninterrupted 40-step run."""
    out = tmp_path_factory.mktemp("straight")
    return train(compose_config(RESUMABLE), out), load_checkpoint(out / "checkpoints" / "last.pt")


# -----------------------------------------------------------------------------
# resume


@pytest.mark.slow
def test_sigterm_then_resume_matches_a_straight_run(mnist_root, tmp_path, monkeypatch, straight_run):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # A kill at step 13: between log, evaluation and checkpoint steps.
    with_step_hook(monkeypatch, lambda n, run: n == 13 and signal.raise_signal(signal.SIGTERM))
    with pytest.raises(Interrupted, match="SIGTERM at step 13") as err:
        train(compose_config(RESUMABLE), tmp_path)
    assert err.value.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 13
    monkeypatch.undo()

    resumed = train(compose_config([*RESUMABLE, "train.resume=true"]), tmp_path)
    straight, straight_state = straight_run
    assert {k: resumed[k] for k in RESULTS} == {k: straight[k] for k in RESULTS}
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for key in (*STATE_KEYS, "step", "best_val"):
        assert_same_state(state[key], straight_state[key], key)


def test_sigterm_and_sigint_are_deferred_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with deferred_signals() as received:
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt here
        signal.raise_signal(signal.SIGTERM)
    assert received == [signal.SIGINT, signal.SIGTERM]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.slow
def test_resume_after_a_crash_matches_a_straight_run_and_logs_each_step_once(
    mnist_root, tmp_path, monkeypatch, straight_run
):
    def crash(n, run):
        if n == 35:  # a hard kill: after the checkpoint at step 20 and the log at step 30
            raise RuntimeError("killed")

    with_step_hook(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(compose_config(RESUMABLE), tmp_path)
    monkeypatch.undo()
    resumed = train(compose_config([*RESUMABLE, "train.resume=true"]), tmp_path)
    straight, straight_state = straight_run
    assert {k: resumed[k] for k in RESULTS} == {k: straight[k] for k in RESULTS}
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for key in STATE_KEYS:
        assert_same_state(state[key], straight_state[key], key)
    # The resumed writer hides what the crashed run logged after its checkpoint.
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30, 40]
    assert [e.step for e in events.Scalars("val/nelbo")] == [20, 40]


def run_gvae(args: list[str], cwd: Path) -> subprocess.Popen:
    """`python -m gvae.train args` in cwd, output captured."""
    return subprocess.Popen([sys.executable, "-m", "gvae.train", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the job's log holds `text` (the training loop is running)."""
    deadline = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text()):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.2)


# Evaluate every 10 steps so that "val nelbo" in the log says the loop is running; checkpoint only
# at the end or on a signal.
LONG = [*TINY, "train.eval_every=10", "train.ckpt_every=100000", "data.num_val=500"]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_same_command_with_resume_finishes(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [*LONG, f"hydra.run.dir={run_dir}"]
    proc = run_gvae([*args, "train.max_steps=100000"], tmp_path)
    wait_for_line(run_dir / "train.log", "val nelbo", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    step = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert step >= 10
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["status"] == "interrupted" and f"SIGTERM at step {step}" in failed["error"]

    proc = run_gvae([*args, "train.resume=true", f"train.max_steps={step + 5}"], tmp_path)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["step"] == step + 5
    assert f"at step {step}" in (run_dir / "train.log").read_text()  # "resumed from ... at step N"
    assert not (run_dir / "failed.json").exists()


# -----------------------------------------------------------------------------
# sweeps restart cheaply


@pytest.mark.slow
def test_rerunning_an_interrupted_sweep_skips_finished_jobs_and_resumes_the_others(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *LONG, f"hydra.sweep.dir={sweep}", "train.resume=true"]
    # Job 0 finishes in 20 steps; job 1 is running when the machine is "pre-empted".
    proc = run_gvae([*args, "train.max_steps=20,100000"], tmp_path)
    wait_for_line(sweep / "1" / "train.log", "val nelbo", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    done = (sweep / "0" / "metrics.json").read_text()
    assert json.loads(done)["status"] == "complete"
    step = load_checkpoint(sweep / "1" / "checkpoints" / "last.pt")["step"]
    events_0 = sorted(p.name for p in (sweep / "0").glob("events.*"))

    # The same sweep again (job 1 shortened so the test ends).
    proc = run_gvae([*args, f"train.max_steps=20,{step + 5}"], tmp_path)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert (sweep / "0" / "metrics.json").read_text() == done  # not trained or evaluated again
    assert sorted(p.name for p in (sweep / "0").glob("events.*")) == events_0
    assert "already finished 20 steps" in (sweep / "0" / "train.log").read_text()
    assert f"at step {step}" in (sweep / "1" / "train.log").read_text()
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["step"] == step + 5


# -----------------------------------------------------------------------------
# numerical faults


@pytest.mark.slow
def test_divergence_stops_at_the_next_check_and_keeps_the_last_good_checkpoint(
    mnist_root, tmp_path, monkeypatch
):
    def poison(n, run):
        if n == 25:  # after the checkpoint at step 20
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("nan"))

    with_step_hook(monkeypatch, poison)
    with pytest.raises(NonFiniteError, match=r"between steps 20 and 30.*\(step 20\), is kept"):
        train(compose_config(RESUMABLE), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 20
    assert all(t.isfinite().all() for t in state["model"].values())
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_a_diverging_job_fails_alone_in_a_multirun(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_gvae(["-m", *TINY, "train.max_steps=20", "data.num_val=500", f"hydra.sweep.dir={sweep}",
                     "optim.lr=1e30,1e-3"], tmp_path)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0, out
    assert "non-finite loss or parameters between steps 0 and 10" in out
    failed = json.loads((sweep / "0" / "failed.json").read_text())
    assert failed["status"] == "failed"
    assert failed["error"].startswith("NonFiniteError: non-finite loss or parameters between steps 0 and 10")
    assert not (sweep / "0" / "checkpoints").exists() and not (sweep / "0" / "metrics.json").exists()
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "complete"  # still ran


# -----------------------------------------------------------------------------
# checkpoints


def saved_config(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(list(overrides)), resolve=True, enum_to_str=True)


def test_checkpoint_from_another_model_or_estimator_names_each_difference():
    saved = saved_config("model.num_vars=30", "estimator=st_gumbel_softmax")
    with pytest.raises(CheckpointError) as err:
        check_compatible(Path("last.pt"), saved, compose_config())
    message = str(err.value)
    assert "model.num_vars: 30 in the checkpoint, 20 now" in message
    assert "estimator.name: 'st_gumbel_softmax' in the checkpoint, 'gumbel_softmax' now" in message
    assert "model.num_classes" not in message


def test_checkpoint_allows_a_longer_run_on_another_device_with_other_cadences():
    saved = saved_config("train.max_steps=100", "device=cpu", "train.eval_every=7", "eval.num_samples=5",
                         "data.root=/elsewhere")
    check_compatible(Path("last.pt"), saved, compose_config(["train.max_steps=200", "device=auto"]))


def test_resume_from_a_mismatched_checkpoint_fails_before_training(tmp_path):
    state = {k: {} for k in ("model", "estimator", "optimizer", "sampler", "rng")}
    state.update(step=10, best_val=1.0, config=saved_config(*TINY, "model.hidden=[64]"))
    (tmp_path / "checkpoints").mkdir()
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", state)
    with pytest.raises(CheckpointError, match=r"model.hidden: \[64\] in the checkpoint, \[512, 256\] now"):
        train(compose_config([*TINY, "train.resume=true"]), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_checkpoints_load_tensors_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Path("/etc/passwd")}, path)  # an arbitrary pickled object
    with pytest.raises(CheckpointError, match=f"{path} cannot be read"):
        load_checkpoint(path)


def test_damaged_or_foreign_checkpoints_are_named(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="is not a gvae checkpoint: missing"):
        load_checkpoint(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{path} cannot be read"):
        load_checkpoint(path)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def torch_save_then_die(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(torch, "save", torch_save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 1}


# -----------------------------------------------------------------------------
# data faults


@pytest.fixture
def gz_copy(mnist_root: Path, tmp_path: Path) -> Path:
    """A writable MNIST/raw/ holding copies of the four .gz files only; returns that folder."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        (raw / f"{name}.gz").write_bytes((mnist_root / "MNIST" / "raw" / f"{name}.gz").read_bytes())
    return raw


def raw_bytes(mnist_root: Path, name: str) -> bytes:
    """The real decompressed IDX file `name`."""
    return gzip.decompress((mnist_root / "MNIST" / "raw" / f"{name}.gz").read_bytes())


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_middle_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def wrong_magic(data: bytes) -> bytes:
    return (2051).to_bytes(4, "big") + data[4:]  # an images header on a labels file


# fault: (the .gz's new contents made from the real IDX file's bytes, words the error must hold)
GZ_FAULTS = {
    "truncated_gz": (lambda raw: truncate(gzip.compress(raw)), "cannot decompress"),
    "not_gzip": (lambda raw: b"PK\x03\x04" + gzip.compress(raw)[4:], "cannot decompress"),
    "damaged_gzip_stream": (lambda raw: flip_middle_byte(gzip.compress(raw)), "cannot decompress"),
    "truncated_idx_in_good_gzip": (lambda raw: gzip.compress(truncate(raw)), "bytes, expected"),
    "wrong_magic_in_good_gzip": (lambda raw: gzip.compress(wrong_magic(raw)), "wrong magic number 2051"),
    "damaged_idx_in_good_gzip": (lambda raw: gzip.compress(flip_middle_byte(raw)), "MD5"),
}


@pytest.mark.parametrize("fault", GZ_FAULTS)
def test_damaged_gz_file_is_named_and_leaves_no_decompressed_file(mnist_root, gz_copy, fault):
    make, words = GZ_FAULTS[fault]
    name = "train-labels-idx1-ubyte"
    (gz_copy / f"{name}.gz").write_bytes(make(raw_bytes(mnist_root, name)))
    with pytest.raises(DataError, match=f"{gz_copy / name}.gz: ") as err:
        prepare_mnist(gz_copy.parent.parent, download=False)
    assert words in str(err.value)
    assert not (gz_copy / name).exists()
    assert not [p.name for p in gz_copy.iterdir() if "partial" in p.name]


# fault: (the IDX file's new contents made from its real bytes, words the error must hold)
RAW_FAULTS = {
    "truncated": (truncate, "bytes, expected"),
    "wrong_magic": (wrong_magic, "wrong magic number 2051, expected 2049"),
    "damaged_contents": (flip_middle_byte, "MD5"),
}


@pytest.mark.parametrize("fault", RAW_FAULTS)
@pytest.mark.parametrize("beside_gz", [True, False], ids=["stale_beside_gz", "alone"])
def test_damaged_idx_file_is_named_and_never_used(mnist_root, gz_copy, fault, beside_gz):
    damage, words = RAW_FAULTS[fault]
    name = "t10k-labels-idx1-ubyte"
    (gz_copy / name).write_bytes(damage(raw_bytes(mnist_root, name)))
    if not beside_gz:
        (gz_copy / f"{name}.gz").unlink()
    with pytest.raises(DataError, match=f"{gz_copy / name}: ") as err:
        prepare_mnist(gz_copy.parent.parent, download=False)
    assert words in str(err.value)
    # Beside its .gz, a stale decompressed copy: the message says how to get a good one.
    assert (f"delete it and gvae will decompress {gz_copy / name}.gz again" in str(err.value)) == beside_gz


def test_missing_data_with_downloading_off_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        prepare_mnist(tmp_path, download=False)
    message = str(err.value)
    assert f"missing in {tmp_path / 'MNIST' / 'raw'}" in message
    for hint in ("data.root", "$GVAE_DATA_DIR", "data.download=true"):
        assert hint in message


@pytest.mark.slow
def test_data_fault_in_a_run_exits_non_zero_with_the_message(mnist_root, gz_copy, tmp_path):
    gz = gz_copy / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(truncate(gz.read_bytes()))
    run_dir = tmp_path / "run"
    proc = run_gvae([*TINY, f"data.root={gz_copy.parent.parent}", f"hydra.run.dir={run_dir}"], tmp_path)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    assert f"{gz}: cannot decompress" in out
    assert json.loads((run_dir / "failed.json").read_text())["error"].startswith(f"DataError: {gz}")
