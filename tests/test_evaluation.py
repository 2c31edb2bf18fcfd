"""Evaluation: gvae-eval on a finished run and on a sweep, and what a sweeper is given to minimise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra.test_utils.test_utils import SweepTaskFunction
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gvae.train
from gvae.checkpoint import load_checkpoint, save_checkpoint
from gvae.config import config_path, register_configs
from gvae.evaluation import main as gvae_eval
from tests.conftest import SMALL


@pytest.fixture
def sweep(tiny_sweep) -> Path:
    return tiny_sweep


def fresh_copy(sweep: Path, tmp_path: Path) -> Path:
    return shutil.copytree(sweep, tmp_path / "sweep")


@pytest.mark.slow
def test_gvae_eval_on_a_run_writes_eval_json_and_tensorboard_scalars(sweep, tmp_path, caplog):
    run = fresh_copy(sweep, tmp_path) / "0"
    metrics_before = (run / "metrics.json").read_text()
    assert gvae_eval([str(run), "eval.num_samples=16", "eval.relaxed=true"]) == 0
    record = json.loads((run / "eval.json").read_text())
    metrics = json.loads(metrics_before)
    assert (run / "metrics.json").read_text() == metrics_before  # training's record is kept
    assert record["step"] == metrics["step"] == 40 and record["num_samples"] == 16
    assert record["eval"]["num_samples"] == 16
    # The same checkpoint, data and evaluation seed as training's final evaluation: the same figures.
    assert record["val_nelbo"] == pytest.approx(metrics["val_nelbo"], rel=1e-6)
    assert record["test_nelbo"] == pytest.approx(metrics["test_nelbo"], rel=1e-6)
    # With more samples the bound can only tighten on average; 16 samples against 4, 10,000 images.
    assert record["test_bound"] < record["test_nelbo"] and record["test_bound"] < metrics["test_bound"]
    assert record["relaxed_tau"] == 1.0 and "test_relaxed_nelbo" in record

    events = EventAccumulator(str(run))
    events.Reload()
    scalars = events.Tags()["scalars"]
    tags = ("eval/val_nelbo", "eval/test_nelbo", "eval/test_bound_m16", "eval/test_relaxed_nelbo_not_a_bound")
    assert set(tags) <= set(scalars), scalars
    assert events.Scalars("eval/test_bound_m16")[-1].value == pytest.approx(record["test_bound"])
    assert "test/bound" in scalars  # training's own scalars are still there

    # A second call with the same settings does nothing; --force evaluates again.
    caplog.clear()
    assert gvae_eval([str(run), "eval.num_samples=16", "eval.relaxed=true"]) == 0
    assert "already evaluated" in caplog.text


@pytest.mark.slow
def test_gvae_eval_on_a_sweep_evaluates_every_finished_job_and_names_the_others(sweep, tmp_path, caplog):
    copy = fresh_copy(sweep, tmp_path)
    (copy / "1" / "metrics.json").unlink()  # a job that never finished
    assert gvae_eval([str(copy), "eval.num_samples=2"]) == 1
    assert (copy / "0" / "eval.json").is_file() and not (copy / "1" / "eval.json").exists()
    assert f"{copy / '1'} skipped: not finished" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("optim.lr=1", "only data.download, data.mirrors, data.root, device, eval.* may be set"),
    ("eval.num_samples=many", "could not be converted to Integer"),
    ("eval.num_sample=4", "Key 'num_sample' not in 'EvalConfig'"),
    ("eval.num_samples=0", "eval.num_samples=0 is not allowed: must be >= 1"),
])
def test_gvae_eval_rejects_bad_overrides_naming_them(sweep, tmp_path, caplog, override, message):
    copy = fresh_copy(sweep, tmp_path)
    assert gvae_eval([str(copy / "0"), override]) == 1
    assert message in caplog.text
    assert not (copy / "0" / "eval.json").exists()


def test_gvae_eval_names_a_folder_that_holds_no_run(tmp_path, caplog):
    assert gvae_eval([str(tmp_path)]) == 1
    assert f"{tmp_path} is neither a run folder" in caplog.text


@pytest.mark.slow
def test_a_sweeper_is_given_the_best_validation_figure_not_a_test_figure(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("GVAE_DATA_DIR", str(mnist_root))
    register_configs()
    sweep = SweepTaskFunction()
    sweep.calling_file, sweep.calling_module = None, "gvae.train"
    sweep.config_path, sweep.config_name = config_path(), "config"
    sweep.task_function = gvae.train.main.__wrapped__  # the function under @hydra.main
    sweep.overrides = ["seed=0,1", *SMALL]
    sweep.temp_dir = str(tmp_path / "sweep")
    with sweep:  # runs the multirun; the folder is removed on leaving
        returns = [job.return_value for batch in sweep.returns for job in batch]
        jobs = sorted(p for p in Path(sweep.temp_dir).iterdir() if (p / "metrics.json").is_file())
        metrics = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    assert len(returns) == len(metrics) == 2
    for value, m in zip(returns, metrics, strict=True):
        assert value == m["val_nelbo_best"] != m["test_bound"]


@pytest.mark.slow
def test_gvae_eval_refuses_a_folder_a_live_run_holds_and_evaluates_the_rest(sweep, tmp_path, caplog):
    from gvae.run_folder import RunFolder

    copy = fresh_copy(sweep, tmp_path)
    with RunFolder(copy / "0"):  # as a run training there holds it
        assert gvae_eval([str(copy), "eval.num_samples=2"]) == 1
    assert not (copy / "0" / "eval.json").exists() and (copy / "1" / "eval.json").is_file()
    assert f"{copy / '0'} skipped: {copy / '0'} is in use by another run" in caplog.text


@pytest.mark.slow
def test_eval_json_names_the_state_it_is_of_and_is_redone_for_another(sweep, tmp_path, caplog):
    """eval.json carries the step and the checkpoint's checksum it came from (metrics.json the same
    checksum); a run trained again in the folder has another, so it is not skipped as evaluated."""
    run = fresh_copy(sweep, tmp_path) / "0"
    assert gvae_eval([str(run), "eval.num_samples=2"]) == 0
    record = json.loads((run / "eval.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert record["checkpoint_sha256"] == metrics["checkpoint_sha256"]
    assert len(record["checkpoint_sha256"]) == 64
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state["val_nelbo_best"] += 1.0  # another state, at the same step
    save_checkpoint(run / "checkpoints" / "last.pt", state)
    caplog.clear()
    assert gvae_eval([str(run), "eval.num_samples=2"]) == 0
    assert "already evaluated" not in caplog.text
    assert json.loads((run / "eval.json").read_text())["checkpoint_sha256"] != record["checkpoint_sha256"]


def test_gvae_eval_without_a_folder_is_an_error_and_a_folder_with_an_equals_sign_is_a_folder(tmp_path, capsys,
                                                                                              caplog):
    with pytest.raises(SystemExit) as exit_:
        gvae_eval(["eval.num_samples=2"])
    assert exit_.value.code == 2 and "no run or sweep folder given" in capsys.readouterr().err
    odd = tmp_path / "lr=1e-3"
    odd.mkdir()
    assert gvae_eval([str(odd)]) == 1
    assert f"{odd} is neither a run folder" in caplog.text  # read as the folder it is, not an override


@pytest.mark.slow
def test_gvae_eval_goes_on_past_a_job_it_cannot_read_and_stops_for_a_bad_override(sweep, tmp_path, caplog):
    copy = fresh_copy(sweep, tmp_path)
    config = copy / "0" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("name: gumbel_softmax", "name: no_such_estimator"))
    assert gvae_eval([str(copy), "eval.num_samples=2"]) == 1
    assert "no_such_estimator" in caplog.text and (copy / "1" / "eval.json").is_file()
    caplog.clear()
    assert gvae_eval([str(copy), "optim.lr=1"]) == 1  # wrong for every job: said once
    assert caplog.text.count("only data.download") == 1


@pytest.mark.slow
def test_an_unwritable_run_folder_is_skipped_before_its_evaluation(sweep, tmp_path, caplog, monkeypatch):
    # os.access stands in for the permission (these machines run as root, which writes anywhere).
    run = fresh_copy(sweep, tmp_path) / "0"
    monkeypatch.setattr("gvae.evaluation.os.access", lambda path, mode: Path(path) != run)
    monkeypatch.setattr("gvae.evaluation.load_model", lambda *a: pytest.fail("the model was loaded"))
    assert gvae_eval([str(run)]) == 1
    assert f"{run} is not writable" in caplog.text
