"""What each config key means to a run, declared once, on the schema field that holds it.

A field's role answers every question the rest of gvae asks about a key: whether it says what a
checkpoint's tensors and random streams mean (so a resume must not change it), whether it belongs
to the record of a result, whether the runs of one pack may differ in it, whether it is part of a
job's setting (what a table averages seeds over), and whether gvae-eval may set it. Schemas
declare it with the helpers below (`lr: float = per_run(1e-3)`); a field of a nested schema
without one takes its parent field's role, and the root's default is RUN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ROLE = "gvae_role"  # the dataclasses field metadata key


@dataclass(frozen=True)
class Role:
    name: str
    defines_run: bool  # what a checkpoint means: must match to resume, and to say a result is its run's
    in_record: bool  # what a result was computed with (a table's record of a job)
    per_run: bool  # may differ between the runs of one pack
    in_setting: bool  # part of a job's setting: a table averages the seeds of one setting
    eval_may_set: bool  # gvae-eval and gvae-sample may set it


RUN = Role("run", defines_run=True, in_record=True, per_run=False, in_setting=True, eval_may_set=False)
PER_RUN = Role("per_run", defines_run=True, in_record=True, per_run=True, in_setting=True, eval_may_set=False)
SEED = Role("seed", defines_run=True, in_record=True, per_run=True, in_setting=False, eval_may_set=False)
# How long a run trains: raising it on resume trains on; the figures belong to it.
LENGTH = Role("length", defines_run=False, in_record=True, per_run=False, in_setting=True, eval_may_set=False)
# How often the loop logs, evaluates, checkpoints or diagnoses: may change on resume.
CADENCE = Role("cadence", defines_run=False, in_record=False, per_run=False, in_setting=True,
               eval_may_set=False)
# How often a checkpoint is written: a run resumed from any checkpoint ends as the straight run ends
# (tests/test_train.py), so a sweep relaunched with another value is the same sweep, setting for setting.
CHECKPOINTS = Role("checkpoints", defines_run=False, in_record=False, per_run=False, in_setting=False,
                   eval_may_set=False)
# How a run is executed, not what it computes: the step mode, resuming.
EXECUTION = Role("execution", defines_run=False, in_record=False, per_run=False, in_setting=False,
                 eval_may_set=False)
DEVICE = Role("device", defines_run=False, in_record=False, per_run=False, in_setting=False,
              eval_may_set=True)
EVALUATION = Role("evaluation", defines_run=False, in_record=False, per_run=False, in_setting=False,
                  eval_may_set=True)
# Where the data are read from: the same data wherever they are.
LOCATION = Role("location", defines_run=False, in_record=False, per_run=True, in_setting=False,
                eval_may_set=True)


def role_field(role: Role, default: Any = dataclasses.MISSING,
               default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with `role`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={ROLE: role})


def per_run(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field the runs of one pack may differ in (a learning rate, a float estimator option)."""
    return role_field(PER_RUN, default, **kwargs)


def roles(cfg: Any, inherited: Role = RUN, prefix: str = "") -> Iterator[tuple[str, Role]]:
    """(dotted key, role) for every leaf of a typed config (dataclass instances), depth first; a
    nested schema's keys also yield the schema's own key before their own."""
    for f in dataclasses.fields(cfg):
        role = f.metadata.get(ROLE, inherited)
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        yield key, role
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from roles(value, role, f"{key}.")


def role_of(cfg: Any, key: str) -> Role | None:
    """The role of a dotted `key` (a leaf, or a group such as `eval`) in the typed config; a key
    below what the schema holds (another estimator's option) takes its group's. None if the key's
    first part is no config key at all (Hydra's own keys, `experiment`, helper keys)."""
    role, node = None, cfg
    for part in key.split("."):
        if not (dataclasses.is_dataclass(node) and not isinstance(node, type)):
            return role
        field = next((f for f in dataclasses.fields(node) if f.name == part), None)
        if field is None:
            return role
        role, node = field.metadata.get(ROLE, role or RUN), getattr(node, part)
    return role


def keys_with(cfg: Any, flat: dict[str, Any], wanted: str) -> dict[str, Any]:
    """The entries of a flattened config (`flat`, the typed `cfg`'s) whose role has `wanted` set."""
    table = dict(roles(cfg))
    return {k: v for k, v in flat.items() if k in table and getattr(table[k], wanted)}
