"""scripts/gpu_check.sh, the one command a rare GPU lease runs, proven here before it is needed: its
dry run does every stage on the CPU at tiny sizes and writes every file the GPU run would."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["env", "tests", "bench", "bench_packed", "default_run", "table1", "table1_record", "reinmax",
          "reinmax_record"]


@pytest.mark.slow
def test_the_dry_run_passes_every_stage_and_writes_every_file(mnist_root, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "BUDGET": "1500", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == STAGES
    failed = {s["stage"]: s["rc"] for s in stages if s["rc"] != 0}
    assert not failed, f"stages failed: {failed}\n{result.stdout[-3000:]}"

    for name in ("env.txt", "pytest.log", "default_run.json"):
        assert (out / name).stat().st_size > 0, name
    assert "passed" in (out / "pytest.log").read_text()
    modes = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert {"baseline", "eager"} <= {m["mode"] for m in modes} and all(m["device"] == "cpu" for m in modes)
    packed = [json.loads(line) for line in (out / "bench_packed.jsonl").read_text().splitlines()]
    assert [p["runs"] for p in packed] == [1, 2]
    assert json.loads((out / "default_run.json").read_text())["status"] == "complete"

    # The tables come back as the committed records do: every job finished, and rendered.
    for folder, sweeps in (("table1_gpu", 4), ("reinmax_gpu", 1)):
        record = json.loads((out / folder / "jobs.json").read_text())
        assert len(record["sweeps"]) == sweeps
        assert record["jobs"] and all(j["status"] == "complete" for j in record["jobs"]), folder
        assert (out / folder / "results.md").is_file() and (out / folder / "figure.png").is_file()
    table = json.loads((out / "table1_gpu" / "jobs.json").read_text())
    evaluated = [j for j in table["jobs"] if j.get("eval")]
    assert evaluated and all(j["eval"]["num_samples"] == 2 for j in evaluated)  # the dry run's m


def test_the_script_refuses_an_unknown_argument():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dryrun"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "usage: scripts/gpu_check.sh [--dry-run]" in result.stderr
