"""Every config file composes, validates and instantiates; typos and wrong types fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from gvae import configs
from gvae.config import hydra_initialized, validate
from gvae.estimators import ESTIMATORS, Estimator, build_estimator
from gvae.model import VAE
from gvae.objective import training_loss
from tests.conftest import compose_config

CONFIG_DIR = Path(configs.__file__).parent  # the folder Hydra reads, found through the package
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and list(p.glob("*.yaml")))
# Every option of every group, read from the folder so that a new file is covered automatically.
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONFIG_DIR / group).glob("*.yaml"))]


def build(overrides: list[str]) -> tuple[DictConfig, VAE, Estimator, torch.optim.Optimizer]:
    """Compose and validate the config, build the model and the estimator, instantiate the optimizer."""
    cfg = compose_config(overrides)
    validate(cfg)
    torch.manual_seed(0)
    model = VAE(cfg.model)
    estimator = build_estimator(cfg.estimator, model.latent)
    optimizer = hydra.utils.instantiate(cfg.optim)(list(model.parameters()) + list(estimator.parameters()))
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == cfg.optim.lr
    return cfg, model, estimator, optimizer


def build_and_step(overrides: list[str]) -> None:
    """Build everything, then a training loss and its gradient on a random binary batch."""
    cfg, model, estimator, _ = build(overrides)
    x = (torch.rand(8, 784) < 0.3).float()
    loss, parts = training_loss(model, estimator, x, torch.tensor(cfg.schedule.tau0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(parts).all()
    encoder_grad = model.encoder[0].weight.grad
    assert encoder_grad is not None and torch.isfinite(encoder_grad).all() and encoder_grad.abs().sum() > 0


def test_config_folder_has_the_documented_groups():
    expected = {"data", "model", "estimator", "schedule", "optim", "train", "eval", "experiment"}
    assert expected <= set(GROUPS), GROUPS


def test_default_config_composes_and_instantiates():
    build_and_step([])


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes_and_instantiates(group, option):
    build_and_step([f"{group}={option}"])


def sweep_overrides() -> list[list[str]]:
    """For each experiment that declares a sweep, each value of each swept key on its own."""
    parser = OverridesParser.create()
    cases = []
    for experiment in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        with hydra_initialized():
            cfg = compose(config_name="config", overrides=[f"experiment={experiment.stem}"],
                          return_hydra_config=True)
        params = cfg.hydra.sweeper.get("params") or {}
        for key, values in params.items():
            (override,) = parser.parse_overrides([f"{key}={values}"])
            for value in override.sweep_string_iterator():
                cases.append([f"experiment={experiment.stem}", f"{key}={value}"])
    return cases


SWEEPS = sweep_overrides()


@pytest.mark.parametrize("overrides", SWEEPS, ids=[" ".join(o) for o in SWEEPS])
def test_every_value_of_every_config_sweep_composes_and_instantiates(overrides):
    build(overrides)


def test_sweep_rows_choose_the_estimator_and_the_schedule():
    cfg = compose_config(["experiment=paper_sweep", "+row={estimator:darn,every:500,rate:1.0e-5}"])
    assert cfg.estimator.name == "darn"
    assert cfg.schedule.every == 500 and cfg.schedule.rate == 1.0e-5


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.num_var=3", "model.num_var"),  # misspelt key
        ("train.max_step=10", "train.max_step"),
        ("train.batch_size=abc", "train.batch_size"),  # wrong type
        ("schedule.tau0=warm", "schedule.tau0"),
        ("data.binarization=sometimes", "data.binarization"),  # not one of the enum's values
        ("model.hidden=7", "model.hidden"),  # a number where a list is expected
    ],
)
def test_bad_override_fails_at_composition_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    assert key in str(err.value)


def test_misspelt_key_in_a_config_file_fails_naming_the_key(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "typo.yaml").write_text("latent: categorical\nnum_var: 3\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([f"hydra.searchpath=[file://{tmp_path}]", "model=typo"])
    message = f"{err.value} {err.value.__cause__}"
    assert "model.num_var" in message


def test_help_names_every_group_with_its_options_and_every_estimator_with_a_line():
    result = subprocess.run([sys.executable, "-m", "gvae.train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        assert f"{group.name}: {options}" in lines
    assert not any("_schema" in line for line in lines if not line.startswith(" "))
    for name, cls in ESTIMATORS.items():
        first = cls.__doc__.strip().splitlines()[0]
        assert any(line.startswith(name) and line.endswith(first) for line in lines), name
