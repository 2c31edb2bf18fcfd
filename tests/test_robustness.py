"""docs/robustness.md's faults that end a run: one folder per run, a refused run that changes
nothing, and every failure of a run ending with one message, a status and failed.json."""

from __future__ import annotations

import errno
import io
import json
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gvae.checkpoint
import gvae.engine
import gvae.files
import gvae.train
import gvae.trainer
from gvae.checkpoint import load_checkpoint
from gvae.errors import GvaeError, Interrupted, Stopped
from gvae.run_folder import describe_failure
from tests.conftest import SYNTHETIC, gvae_train


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in the folder, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_main(args: list[str], monkeypatch) -> int | None:
    """gvae-train ARGS in this process (so that a fault can be injected); its exit status."""
    monkeypatch.setattr(sys, "argv", ["gvae-train", *args])
    try:
        gvae.train.main()
    except SystemExit as e:
        return e.code
    return 0


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]


# -----------------------------------------------------------------------------
# a run's record always describes its results


@pytest.mark.slow
def test_a_refused_resume_leaves_the_folder_byte_for_byte_as_it_was(tmp_path):
    run = tmp_path / "run"
    assert gvae_train([*SYNTHETIC, f"hydra.run.dir={run}"], tmp_path).returncode == 0
    before = snapshot(run)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json", "train.log"} <= set(before)
    # The sweep resumed with a typo: another estimator in the same folder.
    result = gvae_train([*SYNTHETIC, "estimator=st_gumbel_softmax", "train.max_steps=80", "train.resume=true",
                         f"hydra.run.dir={run}"], tmp_path)
    assert result.returncode == 1
    assert "estimator.name: 'gumbel_softmax' in the checkpoint, 'st_gumbel_softmax' now" in result.stdout
    assert f"refused: {run} is left as it was" in result.stdout and "Traceback" not in result.stdout
    assert snapshot(run) == before


# -----------------------------------------------------------------------------
# one run per folder


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_stops_at_once_naming_the_folder_and_the_holder(tmp_path):
    run = tmp_path / "run"
    long = [o for o in SYNTHETIC if not o.startswith("train.max_steps")] + ["train.max_steps=1000000"]
    first = gvae_train([*long, f"hydra.run.dir={run}"], tmp_path, wait=False)
    deadline = time.monotonic() + 120
    while not (run / "train.log").is_file() or "device cpu" not in (run / "train.log").read_text():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.2)
    try:
        before = snapshot(run / ".hydra")
        second = gvae_train([*SYNTHETIC, f"hydra.run.dir={run}"], tmp_path)
        assert second.returncode == 1
        assert f"{run} is in use by another run (process {first.pid} on " in second.stdout
        assert "Traceback" not in second.stdout
        assert snapshot(run / ".hydra") == before  # the first run's record is untouched
        assert first.poll() is None  # and the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM
    assert not (run / "running.json").exists()  # the holder's note goes with the holder
    # Killed outright, a holder's lock goes with the process: the folder is free again.
    third = gvae_train([*long, f"hydra.run.dir={run}", "train.resume=true"], tmp_path, wait=False)
    while not (run / "running.json").is_file():
        assert third.poll() is None, third.communicate()[0]
        time.sleep(0.1)
    third.kill()
    third.communicate(timeout=60)
    assert gvae_train([*SYNTHETIC, f"hydra.run.dir={run}", "train.resume=true", "train.max_steps=1000"],
                      tmp_path).returncode == 0


def test_runs_started_in_the_same_second_get_different_default_folders(tmp_path):
    # The default folders are the time to the second, then the process id: processes started in
    # the same second differ by the id.
    code = ("import os; from hydra import compose\n"
            "from gvae.config import hydra_initialized, register_configs\nregister_configs()\n"
            "with hydra_initialized():\n"
            "    cfg = compose(config_name='config', return_hydra_config=True)\n"
            "    print(os.getpid(), cfg.hydra.run.dir, cfg.hydra.sweep.dir)")
    for _ in range(2):
        pid, run_dir, sweep_dir = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                 check=True, cwd=tmp_path).stdout.split()
        assert run_dir.startswith("outputs/runs/") and run_dir.endswith(f"-{pid}")
        assert sweep_dir.startswith("outputs/multirun/") and sweep_dir.endswith(f"-{pid}")


# -----------------------------------------------------------------------------
# every failure of a run: one message, a status, failed.json


@pytest.mark.slow
def test_an_unwritable_checkpoints_folder_fails_with_one_message_and_a_record(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the folder should be")
    result = gvae_train([*SYNTHETIC, f"hydra.run.dir={run}"], tmp_path)
    assert result.returncode == 1
    assert "file system error" in result.stdout and "checkpoints" in result.stdout
    assert "Traceback" not in result.stdout
    failed = json.loads((run / "failed.json").read_text())
    assert failed["status"] == "failed" and "file system error" in failed["error"]
    assert no_temporary_files(run)


def test_a_full_disk_at_a_checkpoint_fails_with_one_message_and_a_record(tmp_path, monkeypatch):
    run = tmp_path / "run"

    def disk_full(path, state):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(gvae.trainer.ckpt, "save_checkpoint", disk_full)
    assert run_main([*SYNTHETIC, f"hydra.run.dir={run}"], monkeypatch) == 1
    failed = json.loads((run / "failed.json").read_text())
    assert failed["status"] == "failed"
    assert "No space left on device" in failed["error"]
    assert "no checkpoint had been written" in failed["error"]
    assert no_temporary_files(run)


def test_torch_saves_report_of_a_full_disk_ends_the_run_with_one_message_and_resumes_exactly(tmp_path,
                                                                                              monkeypatch):
    """torch.save's writer reports a full disk as a RuntimeError ("unexpected pos ..."), which ended
    runs with two tracebacks: here it is the file system error it is, the previous checkpoint is kept,
    and the run resumed from it ends where a straight run ends."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    args = [*SYNTHETIC, "train.ckpt_every=20", "train.max_steps=40"]
    assert run_main([*args, f"hydra.run.dir={straight}"], monkeypatch) == 0
    real_save, calls = torch.save, []

    def fills_the_disk(obj, f, *a, **k):
        calls.append(not isinstance(f, io.BytesIO))  # the envelope's write into the file
        if sum(calls) == 2:  # the second checkpoint: a disk full mid-write, as torch reports it
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(gvae.checkpoint.torch, "save", fills_the_disk)
    monkeypatch.setattr(gvae.files.os, "statvfs", lambda p: type("S", (), {"f_bavail": 0})())
    assert run_main([*args, f"hydra.run.dir={run}"], monkeypatch) == 1
    failed = json.loads((run / "failed.json").read_text())
    assert "No space left on device" in failed["error"] and no_temporary_files(run)
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 20
    assert run_main([*args, f"hydra.run.dir={run}", "train.resume=true"], monkeypatch) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (run, straight))
    assert a["val_curve"] == b["val_curve"] and a["test_bound"] == b["test_bound"]


@pytest.mark.parametrize("where", ["start-up", "final evaluation"])
def test_an_interrupt_outside_the_training_loop_ends_with_a_record(tmp_path, monkeypatch, where):
    run = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C

    module, target = (gvae.engine, "load_splits") if where == "start-up" else (gvae.trainer, "evaluate")
    monkeypatch.setattr(module, target, interrupted)
    assert run_main([*SYNTHETIC, f"hydra.run.dir={run}"], monkeypatch) == 128 + signal.SIGINT
    failed = json.loads((run / "failed.json").read_text())
    assert failed["status"] == "interrupted" and "SIGINT outside the training loop" in failed["error"]
    kept = (run / "checkpoints" / "last.pt").is_file()
    assert kept == (where == "final evaluation")
    assert ("last.pt is kept" in failed["error"]) == kept
    assert not (run / "running.json").exists() and no_temporary_files(run)


def test_a_failed_multirun_job_is_reported_in_one_line_and_the_others_run(tmp_path):
    sweep = tmp_path / "sweep"
    result = gvae_train(["-m", *SYNTHETIC, "optim.betas=[2,3],[0.9,0.999]", f"hydra.sweep.dir={sweep}"],
                        tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout
    assert "job 0 (" in result.stdout and "optim.betas=[2.0, 3.0] is not allowed" in result.stdout
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "complete"


# -----------------------------------------------------------------------------
# machine-readable outputs


def strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{path} holds {constant}, which strict JSON does not allow")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_records_are_strict_json_and_keep_their_meaning_after_a_resume(tmp_path):
    from gvae.files import write_json
    from gvae.jobs import train
    from tests.conftest import compose_config

    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.0]})
    assert strict_json(tmp_path / "x.json") == {"a": None, "b": [None, 1.0]}

    run = tmp_path / "run"
    first = train(compose_config([*SYNTHETIC, "train.max_steps=20"]), run)
    second = train(compose_config([*SYNTHETIC, "train.max_steps=40", "train.resume=true"]), run)
    metrics = strict_json(run / "metrics.json")
    assert metrics["step"] == 40 and metrics["val_curve"][0][0] == 20  # the whole curve
    # wall_seconds is the whole run's (both processes), not the last process's
    assert metrics["wall_seconds"] == second["wall_seconds"] > first["wall_seconds"]


def test_a_ctrl_c_outside_a_run_ends_with_one_line_and_status_130(monkeypatch, capsys):
    import types

    from gvae import cli

    def interrupted_start_up():
        raise KeyboardInterrupt  # Ctrl-C while torch imports or Hydra composes

    monkeypatch.setitem(sys.modules, "slow_to_start", types.SimpleNamespace(main=interrupted_start_up))
    monkeypatch.setattr(sys, "argv", ["gvae-train"])
    with pytest.raises(SystemExit) as exit_:
        cli._run("slow_to_start")
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "gvae-train: interrupted\n"


@pytest.mark.parametrize("error", [Interrupted("SIGTERM: checkpoint at step 7 kept", signal.SIGTERM),
                                   Stopped(signal.SIGINT)], ids=["Interrupted", "Stopped"])
def test_the_signal_errors_cross_a_process_boundary_whole(error):
    """A pack trained in another process hands back its error pickled: the message, the class that
    describe_failure tells apart and the signal number (the exit status is 128 + it) must survive."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.signum == error.signum
    assert describe_failure(copy, Path("/nonexistent")) == describe_failure(error, Path("/nonexistent"))


# -----------------------------------------------------------------------------
# a finished run is never overwritten or misreported


def test_a_finished_run_is_not_overwritten_by_a_run_without_resume(tmp_path, monkeypatch):
    """Reusing a finished run's folder without train.resume is refused, the folder byte for byte as it
    was, with one message saying how to continue, keep or replace it; train.overwrite=true replaces it
    on purpose: the old run's records (its eval.json included) and event files are gone, so neither
    gvae-eval nor TensorBoard sees two runs' figures in one folder."""
    run = tmp_path / "run"
    args = [*SYNTHETIC, "train.max_steps=20", f"hydra.run.dir={run}"]
    assert run_main(args, monkeypatch) == 0
    (run / "eval.json").write_text(json.dumps({"step": 20, "test_bound": 1.0}))
    before = snapshot(run)
    assert run_main(args, monkeypatch) == 1
    assert snapshot(run) == before
    assert run_main([*args, "train.overwrite=true", "seed=1"], monkeypatch) == 0
    assert not (run / "eval.json").exists()
    old_events = {name for name in before if name.startswith("events.out.tfevents.")}
    assert old_events and not old_events & {p.name for p in run.glob("events.out.tfevents.*")}
    assert "seed: 1" in (run / ".hydra" / "config.yaml").read_text().splitlines()


def test_the_refusal_says_how_to_continue_keep_or_replace_the_run(tmp_path):
    run = tmp_path / "run"
    args = [*SYNTHETIC, "train.max_steps=20", f"hydra.run.dir={run}"]
    assert gvae_train(args, tmp_path).returncode == 0
    result = gvae_train(args, tmp_path)
    message = result.stdout
    assert result.returncode == 1 and "Traceback" not in message
    assert f"{run} already holds a finished run (20 steps, metrics.json)" in message
    assert all(hint in message for hint in ("train.resume=true", "hydra.run.dir", "train.overwrite=true"))


def test_resume_and_overwrite_together_are_refused_at_start_up(tmp_path, monkeypatch):
    from gvae.config import compose_config, validate
    from gvae.errors import ConfigError

    with pytest.raises(ConfigError, match="train.overwrite=True is not allowed: train.resume=true continues"):
        validate(compose_config([*SYNTHETIC, "train.resume=true", "train.overwrite=true"]))


def test_a_checkpoint_whose_tensors_do_not_fit_the_model_is_named_in_train_eval_and_sample(tmp_path,
                                                                                         monkeypatch):
    """Its checksum valid and its config the run's, but a tensor of another shape: every reader ends with
    one message naming the file, not a traceback from load_state_dict."""
    from gvae.checkpoint import save_checkpoint
    from gvae.evaluation import evaluate_run
    from gvae.sample import sample_pictures

    run = tmp_path / "run"
    args = [*SYNTHETIC, "train.max_steps=20", f"hydra.run.dir={run}"]
    assert run_main(args, monkeypatch) == 0
    path = run / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("sha256", "path")})
    expected = f"{path}: its model does not fit this run's (Error(s) in loading state_dict for VAE: size"
    for read in (lambda: evaluate_run(run, []), lambda: sample_pictures(run, tmp_path / "pictures")):
        with pytest.raises(GvaeError, match=re.escape(expected)):
            read()
    assert run_main([*args, "train.max_steps=40", "train.resume=true"], monkeypatch) == 1
    assert expected in json.loads((run / "failed.json").read_text())["error"]


def test_a_finished_job_with_a_truncated_metrics_json_is_evaluated_again_on_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = [*SYNTHETIC, "train.max_steps=20", f"hydra.run.dir={run}"]
    assert run_main(args, monkeypatch) == 0
    good = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text((run / "metrics.json").read_text()[:50])  # cut short
    assert run_main([*args, "train.resume=true"], monkeypatch) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["step"] == 20 and again["test_bound"] == good["test_bound"]
    assert again["val_curve"] == good["val_curve"]
    # a resume that only evaluates keeps the last epoch's training figure (restored from the checkpoint)
    assert again["train_nelbo_last_epoch"] == good["train_nelbo_last_epoch"]
