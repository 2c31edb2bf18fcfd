"""Every config key of every schema, fuzzed: a wrong type and the edge values 0, -1, 10^12 (2^63 for
integers), nan and inf. Each value either trains (a short run completes) or is refused with the key
named and no traceback, before anything is built. The keys are read from the schemas, so a key added
to any of them is fuzzed without an edit here."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from gvae.config import compose_config, config_dir, validate
from gvae.errors import GvaeError
from gvae.estimators import ESTIMATORS
from gvae.jobs import train
from gvae.roles import roles
from tests.conftest import SYNTHETIC, estimator_overrides

# A short run on the in-memory data: what an accepted value must complete.
SHORT = [o for o in SYNTHETIC if not o.startswith("train.max_steps=")] + [
    "train.max_steps=3", "data.num_train=200", "data.num_val=16", "data.num_test=16"]
EDGES = {int: ["x", 0, -1, 2**32, 10**12, 2**63], float: ["x", 0, -1, 1e12, "nan", "inf", "-inf"],
         bool: ["x", 2], str: [0, -1], list: ["x", "[0]", "[-1]", "[1e12]", "[nan]"], enum.Enum: ["x", 0]}
# The options whose schemas hold keys of their own, each composed on the short run (MNIST's keys on
# the real data: its files are read once per accepted value).
def latent_for(name: str) -> list[str]:
    return [] if "categorical" in ESTIMATORS[name].config.latents else ["model=bernoulli"]


OPTIONS = ([[]] + [[*estimator_overrides(n), *latent_for(n)] for n in sorted(ESTIMATORS)]
           + [["task=sbn"], ["schedule=constant"], ["optim=sgd"], ["data=mnist"]])


def kind(tp: typing.Any) -> type:
    """The edge values' kind for a schema field's type (Optional[X] is X's)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
    origin = typing.get_origin(tp) or tp
    if isinstance(origin, type) and issubclass(origin, enum.Enum):
        return enum.Enum
    return list if origin in (list, tuple) else origin


def leaf_types(cfg: typing.Any) -> dict[str, type]:
    """Every leaf key of a typed config, with its field's type."""
    out = {}
    for key, _ in roles(cfg):
        *path, name = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        if dataclasses.is_dataclass(getattr(node, name)):
            continue
        hints = typing.get_type_hints(type(node))
        out[key] = kind(hints[name])
    return out


def cases() -> list[tuple[list[str], str, typing.Any]]:
    """(the overrides, key, value): with the defaults, every key; with each other option, the keys of
    the group it chooses; each with its kind's edge values."""
    out = []
    for option in OPTIONS:
        base = SHORT if option != ["data=mnist"] else [o for o in SHORT if not o.startswith("data.")]
        group = option[0].split("=")[0] if option else None
        cfg = validate(compose_config([*base, *option]))
        for key, tp in leaf_types(cfg).items():
            if group is None or key.startswith(group + "."):
                out += [([*base, *option], key, value) for value in EDGES[tp]]
    return out


CASES = cases()


def test_every_schema_key_is_fuzzed():
    """The cases cover each option's keys (a new key is picked up from its schema)."""
    keys = {key for _, key, _ in CASES}
    groups = {p.name for p in config_dir().iterdir() if p.is_dir() and any(p.glob("*.yaml"))}
    assert {"train.max_steps", "optim.lr", "optim.momentum", "optim.eps", "schedule.rate", "seed", "device",
            "estimator.tau", "estimator.k", "estimator.decay", "estimator.learn", "task.samples",
            "task.layers", "data.root", "data.density", "eval.num_samples", "diag.draws",
            "model.hidden"} <= keys
    assert {k.split(".")[0] for k in keys} >= groups - {"experiment", "hydra"}
    assert len(CASES) > 500


def outcome(overrides: list[str], key: str, tmp_path: Path) -> str:
    """"trained", or the message that refused the value; an unexpected exception propagates (a traceback)."""
    try:
        cfg = compose_config(overrides)
        validate(cfg)
    except (GvaeError, HydraException, OmegaConfBaseException) as e:
        return str(e)
    if key == "train.max_steps":  # accepted, however long: what it must do is start and train
        cfg = compose_config([*overrides, "train.max_steps=3"])
    try:
        metrics = train(cfg, tmp_path / "run")
    except GvaeError as e:
        return str(e)
    assert metrics["status"] == "complete"
    return "trained"


@pytest.mark.slow
@pytest.mark.parametrize(("base", "key", "value"), CASES, ids=[f"{b[-1]}:{k}={v}" for b, k, v in CASES])
def test_a_value_trains_or_is_refused_naming_its_key(base, key, value, tmp_path):
    result = outcome([*base, f"{key}={value}"], key, tmp_path)
    assert result == "trained" or key in result, result
