"""The console commands, each importing its module only when it runs.

Importing torch and composing the config take seconds; a Ctrl-C then, or while gvae-eval's bound
runs, would otherwise end in a traceback. A run handles its own interrupts (it saves, writes
failed.json and exits 130 or 143); anything else a Ctrl-C stops ends here with one line and 130.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def _run(module: str, function: str = "main") -> None:
    try:
        status = getattr(importlib.import_module(module), function)()
    except KeyboardInterrupt:
        sys.stderr.write(f"{Path(sys.argv[0]).name}: interrupted\n")
        raise SystemExit(130) from None
    raise SystemExit(status)


def train() -> None:
    _run("gvae.train", "cli")


def evaluate() -> None:
    _run("gvae.evaluation")


def sample() -> None:
    _run("gvae.sample")


def table() -> None:
    _run("gvae.table")
