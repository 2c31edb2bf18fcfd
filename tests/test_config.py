"""gvae/config.py and configs/: every option composes and builds; a typo, a wrong type or an
out-of-range value stops the run at start-up with one message naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from gvae import configs
from gvae.config import Config, config_from_dict, hydra_initialized, validate
from gvae.errors import ConfigError
from gvae.estimators import ESTIMATORS, estimator_cost
from gvae.jobs import train
from gvae.tasks import build_task
from gvae.tasks.vae import VAE
from tests.conftest import TINY, compose_config, estimator_overrides

CONFIG_DIR = Path(configs.__file__).parent  # the folder Hydra reads, found through the package
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and list(p.glob("*.yaml")))
# Every option of every group, read from the folder so that a new file is covered automatically.
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONFIG_DIR / group).glob("*.yaml"))]


def build_and_step(overrides: list[str]) -> Config:
    """Compose and validate, build model, estimator and optimizer, and take a gradient of the
    training loss on a random binary batch of the data's image size."""
    cfg = validate(compose_config(overrides))
    torch.manual_seed(0)
    model = build_task(cfg)  # the VAE, or the task the option names
    estimator = model.build_estimator(cfg.estimator)
    optimizer = hydra.utils.instantiate(cfg.optim)([*model.parameters(), *estimator.parameters()])
    assert isinstance(optimizer, torch.optim.Optimizer) and optimizer.param_groups[0]["lr"] == cfg.optim.lr
    x = (torch.rand(8, cfg.data.num_pixels) < 0.3).float()
    loss, stats = model.training_loss(estimator, x, torch.tensor(cfg.schedule.tau0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats.values).all()
    # The first network (the VAE's encoder, the SBN's first layer) gets a gradient through the latent.
    first = model.encoder if isinstance(model, VAE) else model.nets[0]
    grads = [p.grad for p in first.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    return cfg


def test_config_folder_has_the_documented_groups():
    expected = {"data", "model", "estimator", "schedule", "optim", "train", "eval", "experiment"}
    assert expected <= set(GROUPS), GROUPS


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes_and_builds(group, option):
    overrides = estimator_overrides(option) if group == "estimator" else [f"{group}={option}"]
    if group == "estimator" and "categorical" not in ESTIMATORS[option].config.latents:
        overrides.append("model=bernoulli")
    build_and_step(overrides)


def test_the_convolutional_network_builds_for_every_data_option():
    for data in ("mnist", "synthetic"):
        build_and_step([f"data={data}", "model.net=conv"])


def sweep_overrides() -> list[list[str]]:
    """For each experiment that declares a sweep: each value of each swept key, and each row."""
    parser = OverridesParser.create()
    cases = []
    for experiment in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        with hydra_initialized():
            cfg = compose(config_name="config", overrides=[f"experiment={experiment.stem}"],
                          return_hydra_config=True)
        for key, values in (cfg.hydra.sweeper.get("params") or {}).items():
            (override,) = parser.parse_overrides([f"{key}={values}"])
            if not override.is_discrete_sweep():  # a search's interval: its ends stand for it
                bounds = override.value().start, override.value().end
                cases += [[f"experiment={experiment.stem}", f"{key}={b}"] for b in bounds]
                continue
            values = override.sweep_string_iterator()
            cases += [[f"experiment={experiment.stem}", f"{key}={v}"] for v in values]
        rows = cfg.hydra.sweeper.get("rows") or []
        cases += [[f"experiment={experiment.stem}", *row.split()] for row in rows]
    return cases


SWEEPS = sweep_overrides()


@pytest.mark.parametrize("overrides", SWEEPS, ids=[" ".join(o) for o in SWEEPS])
def test_every_value_and_row_of_every_config_sweep_composes_and_validates(overrides):
    validate(compose_config(overrides))


def test_paper_sweep_rows_set_the_schedule_only_for_estimators_with_a_temperature():
    with hydra_initialized():
        cfg = compose(config_name="config", overrides=["experiment=paper_sweep"], return_hydra_config=True)
    rows = [row.split() for row in cfg.hydra.sweeper.rows]
    estimators = {o.split("=")[1] for row in rows for o in row if o.startswith("estimator=")}
    assert estimators == {"score_function", "darn", "muprop", "straight_through", "slope_annealed_st",
                          "gumbel_softmax", "st_gumbel_softmax"}  # the paper's seven, not the registry
    for row in rows:
        tempered = row[0].split("=")[1] in ("slope_annealed_st", "gumbel_softmax", "st_gumbel_softmax")
        assert any(o.startswith("schedule.") for o in row) == tempered, row


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.num_var=3", "model.num_var"),  # misspelt key
        ("train.max_step=10", "train.max_step"),
        ("train.batch_size=abc", "train.batch_size"),  # wrong type
        ("schedule.tau0=warm", "schedule.tau0"),
        ("data.binarization=sometimes", "data.binarization"),  # not one of the enum's values
        ("model.hidden=7", "model.hidden"),  # a number where a list is expected
        ("train.compile=fast", "train.compile"),
        ("estimator.decay=0.5", "estimator.decay"),  # an option the default estimator does not have
    ],
)
def test_bad_override_fails_at_composition_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    assert key in f"{err.value} {err.value.__cause__}"


@pytest.mark.parametrize("override, words", [
    ("estimator.decay=fast", ["estimator.decay", "could not be converted to Float"]),
    ("estimator.decy=0.5", ["Key 'decy' not in 'ScoreFunctionConfig'"]),
])
def test_a_bad_estimator_option_fails_at_start_up_naming_it(override, words):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["estimator=score_function", override])
    message = f"{err.value} {err.value.__cause__}"
    assert all(w in message for w in words), message


def test_a_key_added_with_plus_that_no_schema_knows_is_named_with_the_closest_key():
    message = r"train.max_step is not a config key; did you mean train.max_steps\?"
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(["+train.max_step=10"]))


def test_misspelt_key_in_a_config_file_fails_naming_the_key(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "typo.yaml").write_text("latent: categorical\nnum_var: 3\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([f"hydra.searchpath=[file://{tmp_path}]", "model=typo"])
    assert "model.num_var" in f"{err.value} {err.value.__cause__}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule.tau0=0"], "schedule.tau0=0.0 is not allowed: must be > 0"),
        (["schedule.tau0=-1"], "schedule.tau0=-1.0 is not allowed: must be > 0"),
        (["schedule.tau_min=2"], "schedule.tau_min=2.0 is not allowed: must be <= schedule.tau0=1.0"),
        (["schedule.rate=-1e-4"], "schedule.rate=-0.0001 is not allowed: must be >= 0"),
        (["model.num_classes=1"], "model.num_classes=1 is not allowed: must be >= 2"),
        (["model.num_vars=0"], "model.num_vars=0 is not allowed: must be >= 1"),
        (["model.net=conv", "model.channels=[8,8,8]"], "model.channels=[8, 8, 8] is not allowed: 3 stride-2"),
        (["train.batch_size=0"], "train.batch_size=0 is not allowed: must be >= 1"),
        (["train.batch_size=-5"], "train.batch_size=-5 is not allowed: must be >= 1"),
        (["eval.num_samples=0"], "eval.num_samples=0 is not allowed: must be >= 1"),
        (["train.eval_every=0"], "train.eval_every=0 is not allowed: must be >= 1"),
        (["train.eval_every=-10"], "train.eval_every=-10 is not allowed: must be >= 1"),
        (["estimator.name=foo"], "estimator.name='foo' is not allowed: one of ["),
        (["estimator=darn", "estimator.decay=1.5"], "estimator.decay=1.5 is not allowed: must be in [0, 1)"),
        (["estimator=darn", "estimator.expand_at=mean"],
         "estimator.expand_at='mean' is not allowed: must be one of sample, center"),
        (["estimator=muprop", "estimator.min_var=0"], "estimator.min_var=0.0 is not allowed: must be > 0"),
        (["optim._target_=torch.optim.Foo"], "optim._target_='torch.optim.Foo' is not allowed: a torch"),
        (["optim._target_=torch.nn.Linear"], "optim._target_='torch.nn.Linear' is not allowed: a torch"),
        (["optim.betas=[2,3]"], "optim.betas=[2.0, 3.0] is not allowed: two numbers in [0, 1)"),
        (["optim=sgd", "optim.momentum=-1"], "optim.momentum=-1.0 is not allowed: must be in [0, 1)"),
        (["device=tpu"], "device='tpu' is not allowed: one of auto, cpu, cuda, cuda:N"),
        (["device=mps"], "device='mps' is not allowed: one of auto, cpu, cuda, cuda:N"),
        (["data.num_val=20000"], "data.num_train + data.num_val (=20000) must be <= 60000"),
        (["estimator=disarm"], "model.latent='categorical' is not allowed: estimator=disarm is defined for "
                               "bernoulli latents only (model=bernoulli); for a categorical latent use"),
        (["estimator=gapped_st", "model=bernoulli"], "gapped_st is defined for categorical latents"),
        (["data=synthetic", "data.parts=5"], "data.parts=5 is not allowed: must divide the image's height"),
    ],
)
def test_out_of_range_value_is_named_with_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert message in str(err.value)


def test_unknown_estimator_lists_the_estimators():
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["estimator.name=foo"]))
    assert all(f"'{name}'" in str(err.value) for name in ESTIMATORS)


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


@pytest.mark.parametrize("group, options", [("optim", ["adam", "sgd"]),
                                            ("estimator", ["gumbel_softmax", "st_gumbel_softmax"])])
def test_unknown_group_option_lists_the_options(group, options):
    with pytest.raises(MissingConfigException) as err:
        compose_config([f"{group}=foo"])
    message = str(err.value)
    assert f"Could not find '{group}/foo'" in message
    assert all(f"\t{o}\n" in message for o in options), message


def test_validate_returns_plain_typed_objects_for_the_loop():
    cfg = validate(compose_config(["estimator=muprop", "schedule=constant"]))
    assert dataclasses.is_dataclass(cfg) and not OmegaConf.is_config(cfg.train)
    assert type(cfg.estimator).__name__ == "MuPropConfig" and cfg.estimator.decay == 0.8
    assert cfg.schedule.temperature(10_000) == cfg.schedule.tau0


def test_yaml_files_select_and_override_but_do_not_restate_a_default():
    """Defaults live in the schemas only: every value an option's YAML sets differs from its schema's."""
    for group, option in OPTIONS:
        if group == "experiment":
            continue
        node = compose_config([f"{group}={option}"])[group]
        defaults = dataclasses.asdict(OmegaConf.get_type(node)())
        text = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")) or {}
        for key, value in text.items():
            if key != "defaults":
                assert value != getattr(defaults.get(key), "value", defaults.get(key)), \
                    f"configs/{group}/{option}.yaml restates the default {key}={value}"


def test_a_saved_config_missing_keys_added_since_is_typed_with_their_defaults():
    old = {"data": {"root": "x", "binarization": "static"},
           "model": {"latent": "categorical", "num_vars": 20},
           "estimator": {"name": "score_function"},
           "schedule": {"name": "exponential", "rate": 1e-4},
           "optim": {"_target_": "torch.optim.SGD", "lr": 3e-3}, "seed": 1}
    cfg = validate(config_from_dict(old))
    assert cfg.data.name == "mnist" and cfg.model.net.value == "mlp" and cfg.estimator.decay == 0.8
    assert cfg.schedule.rate == 1e-4 and cfg.optim.momentum == 0.9 and cfg.seed == 1


def test_train_validates_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="schedule.tau0"):
        train(compose_config([*TINY, "schedule.tau0=-1"]), out)
    assert not out.exists()


@pytest.mark.slow
def test_gvae_train_with_a_bad_value_exits_non_zero_and_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "run"
    gvae_train = Path(sys.executable).parent / "gvae-train"
    proc = subprocess.run([gvae_train, "schedule.tau0=-1", "device=cpu", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert "schedule.tau0=-1.0 is not allowed: must be > 0" in output
    assert "Traceback" not in output
    assert not run_dir.exists()  # refused before anything was written: the empty folder is removed


def test_help_names_every_group_with_its_options_and_every_estimator_with_a_line():
    result = subprocess.run([sys.executable, "-m", "gvae.train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and list(p.glob("*.yaml"))):
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        assert f"{group.name}: {options}" in lines
    assert not any("_schema" in line for line in lines if not line.startswith(" "))
    for name, cls in ESTIMATORS.items():
        first = cls.__doc__.strip().splitlines()[0]
        cost = f"[{estimator_cost(cls)}]"
        assert any(line.startswith(name) and cost in line and line.endswith(first) for line in lines), name
