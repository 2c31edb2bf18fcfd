"""gvae-sample: the three pictures of a finished run, repeatable from their seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gvae.sample import main as gvae_sample

PAD = 2  # torchvision's make_grid: 2 pixels around each 28x28 image
NAMES = ("prior.png", "reconstructions.png", "traversal.png")


def grid_size(columns: int, rows: int) -> tuple[int, int]:
    return columns * (28 + PAD) + PAD, rows * (28 + PAD) + PAD


@pytest.mark.slow
def test_gvae_sample_writes_three_grids_of_the_right_sizes_into_the_run_folder(tiny_sweep, tmp_path):
    run = shutil.copytree(tiny_sweep / "0", tmp_path / "run")
    assert gvae_sample([str(run)]) == 0
    sizes = {name: Image.open(run / name).size for name in NAMES}
    assert sizes["prior.png"] == grid_size(8, 8)  # 64 images
    assert sizes["reconstructions.png"] == grid_size(8, 16)  # 8 rows of inputs, each above its own
    assert sizes["traversal.png"] == grid_size(10, 16)  # 10 classes of the first 16 of 20 variables
    record = json.loads((run / "pictures.json").read_text())  # which state they are of
    metrics = json.loads((run / "metrics.json").read_text())
    assert record["step"] == metrics["step"] and record["checkpoint_sha256"] == metrics["checkpoint_sha256"]
    assert record["files"] == list(NAMES) and record["seed"] == 0


@pytest.mark.slow
def test_an_unwritable_output_folder_is_named_before_any_work(tiny_sweep, tmp_path, caplog, monkeypatch):
    # os.access stands in for the permission (these machines run as root, which writes anywhere).
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr("gvae.sample.os.access", lambda path, mode: Path(path) != out)
    monkeypatch.setattr("gvae.sample.load_model", lambda *a: pytest.fail("the model was loaded"))
    assert gvae_sample([str(tiny_sweep / "0"), "--out", str(out)]) == 1
    assert f"{out} is not writable" in caplog.text and not list(out.iterdir())


@pytest.mark.slow
def test_the_same_seed_gives_the_same_pictures_and_another_seed_others(tiny_sweep, tmp_path):
    run = tiny_sweep / "0"
    for out, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert gvae_sample([str(run), "--out", str(tmp_path / out), "--seed", str(seed), "--num", "25",
                            "--binary"]) == 0
    for name in NAMES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "prior.png").read_bytes() != (tmp_path / "c" / "prior.png").read_bytes()
    assert Image.open(tmp_path / "a" / "prior.png").size == grid_size(5, 5)
    pixels = set(np.asarray(Image.open(tmp_path / "a" / "prior.png").convert("L")).ravel().tolist())
    assert pixels <= {0, 128, 255}  # --binary: black and white images on the grey padding


def test_gvae_sample_names_a_folder_without_a_run(tmp_path, caplog):
    assert gvae_sample([str(Path(tmp_path))]) == 1
    assert ".hydra/config.yaml" in caplog.text
