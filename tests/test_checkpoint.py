"""gvae/checkpoint.py: what a checkpoint holds, that it is written atomically and read as tensors
only, and that a run resumes only from a checkpoint of its own configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gvae.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from gvae.config import container
from gvae.errors import CheckpointError
from gvae.jobs import train
from tests.conftest import TINY, compose_config

# -----------------------------------------------------------------------------
# checkpoints


def saved_config(*overrides: str) -> dict:
    """The plain config a checkpoint of `gvae-train overrides` holds."""
    return container(compose_config(list(overrides)))


def test_checkpoint_from_another_model_or_estimator_names_each_difference():
    saved = saved_config("model.num_vars=30", "estimator=st_gumbel_softmax")
    with pytest.raises(CheckpointError) as err:
        check_compatible(Path("last.pt"), saved, saved_config())
    message = str(err.value)
    assert "model.num_vars: 30 in the checkpoint, 20 now" in message
    assert "estimator.name: 'st_gumbel_softmax' in the checkpoint, 'gumbel_softmax' now" in message
    assert "model.num_classes" not in message


def test_checkpoint_allows_a_longer_run_on_another_device_with_other_cadences():
    saved = saved_config("train.max_steps=100", "device=cpu", "train.eval_every=7", "eval.num_samples=5",
                         "data.root=/elsewhere")
    check_compatible(Path("last.pt"), saved, saved_config("train.max_steps=200", "device=auto"))


def test_resume_from_a_mismatched_checkpoint_fails_before_training(tmp_path):
    state = {k: {} for k in ("model", "estimator", "optimizer", "sampler", "rng")}
    state.update(step=10, val_nelbo_best=1.0, config=saved_config(*TINY, "model.hidden=[64]"))
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
    before = path.read_bytes()

    def torch_save_then_die(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(torch, "save", torch_save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def valid_state(**changes) -> dict:
    state = {"model": {"w": torch.ones(3)}, "estimator": {}, "optimizer": {"state": {}}, "sampler": {},
             "rng": {"cpu": torch.zeros(4, dtype=torch.uint8)}, "step": 5, "val_nelbo_best": float("inf"),
             "config": {}}
    return {**state, **changes}


def test_a_checkpoint_whose_bytes_changed_fails_its_checksum(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, valid_state())
    assert load_checkpoint(path)["step"] == 5
    envelope = torch.load(path, weights_only=True)
    payload = envelope["payload"].clone()
    payload[len(payload) // 2] ^= 1  # one bit, inside the serialized state
    torch.save({**envelope, "payload": payload}, path)
    with pytest.raises(CheckpointError, match=f"{path} is damaged: its contents do not match the checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    ({"model": {"w": torch.tensor([1.0, float("nan")])}}, "non-finite values in model.w"),
    ({"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}},
     r"non-finite values in optimizer.state.0.exp_avg"),
    ({"step": "ten"}, "its 'step' is a str"),
    ({"model": [1, 2]}, "its 'model' is a list"),
], ids=["nan_weight", "inf_optimizer_state", "step_text", "model_list"])
def test_a_checkpoint_with_bad_entries_is_named_and_never_loaded(tmp_path, change, message):
    path = tmp_path / "last.pt"
    save_checkpoint(path, valid_state(**change))  # a correct checksum over wrong contents
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "weights_only=False" not in str(err.value)


def test_a_checkpoint_from_before_the_typed_options_resumes_with_their_defaults():
    """Checkpoints written before estimator options, data options and the network node existed hold
    fewer keys: those keys count as their defaults, which is what the older code used."""
    saved = saved_config("estimator=score_function")
    del saved["estimator"]["decay"], saved["estimator"]["min_var"], saved["model"]["net"]
    del saved["data"]["name"], saved["data"]["image_shape"]
    check_compatible(Path("last.pt"), saved, saved_config("estimator=score_function"))
    with pytest.raises(CheckpointError, match=r"estimator.decay: 0.8 in the checkpoint, 0.5 now"):
        now = saved_config("estimator=score_function", "estimator.decay=0.5")
        check_compatible(Path("last.pt"), saved, now)


def test_the_old_name_of_the_best_validation_figure_is_read(tmp_path):
    state = {k: {} for k in ("model", "estimator", "optimizer", "sampler", "rng", "config")}
    save_checkpoint(tmp_path / "old.pt", {**state, "step": 3, "best_val": 99.0})
    assert load_checkpoint(tmp_path / "old.pt")["val_nelbo_best"] == 99.0
