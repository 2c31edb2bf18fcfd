"""Configuration is checked before anything runs: one message naming the key, the value, what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from gvae.config import validate
from gvae.errors import ConfigError
from gvae.train import train
from tests.conftest import TINY, compose_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule.tau0=0"], "schedule.tau0=0.0 is not allowed: must be > 0"),
        (["schedule.tau0=-1"], "schedule.tau0=-1.0 is not allowed: must be > 0"),
        (["schedule.tau_min=2"], "schedule.tau_min=2.0 is not allowed: must be <= schedule.tau0=1.0"),
        (["schedule.rate=-1e-4"], "schedule.rate=-0.0001 is not allowed: must be >= 0"),
        (["model.num_classes=1"], "model.num_classes=1 is not allowed: must be >= 2"),
        (["model.num_vars=0"], "model.num_vars=0 is not allowed: must be >= 1"),
        (["train.batch_size=0"], "train.batch_size=0 is not allowed: must be >= 1"),
        (["train.batch_size=-5"], "train.batch_size=-5 is not allowed: must be >= 1"),
        (["eval.num_samples=0"], "eval.num_samples=0 is not allowed: must be >= 1"),
        (["train.eval_every=0"], "train.eval_every=0 is not allowed: must be >= 1"),
        (["train.eval_every=-10"], "train.eval_every=-10 is not allowed: must be >= 1"),
        (["estimator.name=foo"], "estimator.name='foo' is not allowed: one of ["),
        (["optim._target_=torch.optim.Foo"], "optim._target_='torch.optim.Foo' is not allowed: a torch"),
        (["optim._target_=torch.nn.Linear"], "optim._target_='torch.nn.Linear' is not allowed: a torch"),
        (["device=tpu"], "device='tpu' is not allowed: one of auto, cpu, cuda, cuda:N"),
        (["device=mps"], "device='mps' is not allowed: one of auto, cpu, cuda, cuda:N"),
        (["data.num_val=20000"], "data.num_train + data.num_val (=20000) must be <= 60000"),
    ],
)
def test_out_of_range_value_is_named_with_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert message in str(err.value)


def test_unknown_estimator_lists_the_estimators():
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["estimator.name=foo"]))
    for name in ("gumbel_softmax", "st_gumbel_softmax"):
        assert f"'{name}'" in str(err.value)


def test_tau_min_above_tau0_is_fine_for_a_constant_schedule():
    validate(compose_config(["schedule=constant", "schedule.tau0=0.3"]))


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_on_a_machine_without_one(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=f"device='{device}' is not allowed: CUDA is not available"):
        validate(compose_config([f"device={device}"]))


def test_cuda_device_index_beyond_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"device='cuda:1' is not allowed: this machine has 1 CUDA device"):
        validate(compose_config(["device=cuda:1"]))


@pytest.mark.parametrize(
    "override, words",
    [
        # An Enum in the schema: the key and the allowed values.
        ("data.binarization=sometimes",
         ["data.binarization", "'sometimes', expected one of [static, dynamic, threshold, none]"]),
        ("model.num_vars=many", ["model.num_vars", "could not be converted to Integer"]),
    ],
)
def test_unknown_or_ill_typed_value_fails_at_composition(override, words):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    message = f"{err.value} {err.value.__cause__}"
    for w in words:
        assert w in message


@pytest.mark.parametrize("group, options", [("optim", ["adam", "sgd"]),
                                            ("estimator", ["gumbel_softmax", "st_gumbel_softmax"])])
def test_unknown_group_option_lists_the_options(group, options):
    with pytest.raises(MissingConfigException) as err:
        compose_config([f"{group}=foo"])
    message = str(err.value)
    assert f"Could not find '{group}/foo'" in message
    assert all(f"\t{o}\n" in message for o in options), message


def test_train_validates_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="schedule.tau0"):
        train(compose_config([*TINY, "schedule.tau0=-1"]), out)
    assert not out.exists()


@pytest.mark.slow
def test_gvae_train_with_a_bad_value_exits_non_zero_and_writes_only_hydras_log(tmp_path):
    run_dir = tmp_path / "run"
    gvae_train = Path(sys.executable).parent / "gvae-train"
    proc = subprocess.run([gvae_train, "schedule.tau0=-1", "device=cpu", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert "schedule.tau0=-1.0 is not allowed: must be > 0" in output
    assert "Traceback" not in output
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]  # no events, checkpoints
    assert "device cpu" not in (run_dir / "train.log").read_text()  # training never started
