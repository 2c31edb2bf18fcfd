"""A quick command line: `gvae-train --help` is Hydra's help without its slow group listing, and
neither `import gvae`, the help, the printed config nor a config error imports torchvision, TensorBoard
or the trainer (scripts/startup_time.py measures what they cost)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torchvision", "tensorboard", "gvae.trainer", "gvae.jobs", "torch._dynamo")
PROBE = """
import runpy, sys
sys.argv = ["gvae-train", *{args!r}]
try:
    runpy.run_module("gvae.train", run_name="__main__")
except SystemExit:
    pass
finally:
    print("HEAVY", [m for m in {heavy!r} if m in sys.modules])
"""


def heavy_modules(args: list[str], tmp_path) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    line = next(line for line in result.stdout.splitlines() if line.startswith("HEAVY"))
    return eval(line.removeprefix("HEAVY "))  # noqa: S307  (our own probe's printed list)


def test_import_gvae_imports_nothing_heavy():
    code = f"import sys, gvae; print([m for m in {HEAVY!r} + ('torch', 'hydra') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=True)
    assert result.stdout.strip() == "[]"


QUICK = {"help": ["--help"], "cfg": ["--cfg", "job"], "error": ["optim.lr=-1", "hydra.run.dir=refused"]}


@pytest.mark.parametrize("args", QUICK.values(), ids=QUICK)
def test_the_quick_paths_import_no_torchvision_nor_the_trainer(args, tmp_path):
    assert heavy_modules(args, tmp_path) == []


@pytest.mark.parametrize("overrides", [[], ["estimator=rebar", "model=bernoulli"]],
                         ids=["default", "overrides"])
def test_the_quick_help_is_hydras_help(overrides, capsys, monkeypatch):
    import gvae.train

    gvae.train.print_help(overrides)
    quick = capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["gvae-train", *overrides, "--help"])
    with pytest.raises(SystemExit):
        gvae.train.main()  # Hydra's own --help
    assert quick == capsys.readouterr().out and "== Estimators (estimator=NAME) ==" in quick
