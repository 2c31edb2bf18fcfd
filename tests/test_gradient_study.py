"""scripts/gradient_study.py on a finished run: a row per estimator, the temperature sweep, the
plot, and the same numbers again from the same command."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from gvae.estimators import ESTIMATORS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gradient_study.py"
spec = importlib.util.spec_from_file_location("gradient_study", SCRIPT)
gradient_study = importlib.util.module_from_spec(spec)
sys.modules["gradient_study"] = gradient_study
spec.loader.exec_module(gradient_study)


@pytest.mark.slow
def test_a_study_covers_every_estimator_of_the_latent_and_is_repeatable(tiny_sweep, tmp_path):
    args = [str(tiny_sweep / "0"), "--draws", "20", "--batch", "4", "--taus", "0.5", "1.0",
            "--reference-draws", "8", "--adapt", "3"]
    assert gradient_study.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert gradient_study.main([*args, "--out", str(tmp_path / "b")]) == 0
    record = json.loads((tmp_path / "a" / "study.json").read_text())
    categorical = {n for n, cls in ESTIMATORS.items() if "categorical" in cls.config.latents}
    expected = {n for n in categorical if "elbo" in ESTIMATORS[n].objectives} | {"rebar_learned"}
    assert set(record["estimators"]) == expected
    assert set(record["left_out"]) == categorical - expected == {"vimco"}
    assert record["reference"] == "local expectation"  # 10^20 codes: not enumerable
    assert set(record["temperature_sweep"]) == {n for n in expected if n in ESTIMATORS
                                                and ESTIMATORS[n].config.uses_temperature}
    table = (tmp_path / "a" / "study.md").read_text()
    assert all(f"| {name} |" in table for name in expected)
    assert (tmp_path / "a" / "study.json").read_text() == (tmp_path / "b" / "study.json").read_text()
    with Image.open(tmp_path / "a" / "study.png") as image:
        assert image.format == "PNG" and image.width > 1000


STUDIES = sorted((SCRIPT.parents[1] / "docs" / "results").glob("gradients_*/study.json"))


@pytest.mark.parametrize("record", STUDIES, ids=[p.parent.name for p in STUDIES])
def test_committed_studies_regenerate_from_their_records(record, tmp_path):
    assert len(STUDIES) >= 2  # the trained 20x10 model and the enumerable 8x4 one
    out = tmp_path / record.parent.name
    out.mkdir()
    (out / "study.json").write_bytes(record.read_bytes())
    assert gradient_study.main(["--render", "--out", str(out)]) == 0
    assert (out / "study.md").read_bytes() == (record.parent / "study.md").read_bytes()
    assert json.loads(record.read_text())["reference"] in ("exact", "local expectation")
