"""Whether two run folders (or two sweeps, job by job) hold the same results, bit for bit: every tensor
of the final checkpoint (model, estimator, optimizer, batch order) and the figures of metrics.json.

    python scripts/compare_runs.py BEFORE AFTER          # exit 0 when every run is identical

For a change that must not change numbers (a reshaping of the code): train the same seeded runs at
the commit before and after, into two folders, and compare them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gvae.checkpoint import load_checkpoint, tensors

PARTS = ("model", "estimator", "optimizer", "sampler")
FIGURES = ("step", "val_nelbo", "val_nelbo_best", "test_nelbo", "test_bound", "val_curve")


def differences(a: Path, b: Path) -> list[str]:
    """What differs between the runs in folders a and b (empty: identical), one line each."""
    found = []
    ca, cb = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (a, b))
    for part in PARTS:
        ta, tb = dict(tensors(ca[part], part)), dict(tensors(cb[part], part))
        if ta.keys() != tb.keys():
            found.append(f"{part}: tensors {sorted(ta.keys() ^ tb.keys())} in one only")
        found += [f"{k}: differs" for k in sorted(ta.keys() & tb.keys()) if not torch.equal(ta[k], tb[k])]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    found += [f"metrics.json {k}: {ma.get(k)!r} and {mb.get(k)!r}" for k in FIGURES if ma.get(k) != mb.get(k)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    found_runs = args.before.glob("**/checkpoints/last.pt")
    runs = sorted(p.parent.parent.relative_to(args.before) for p in found_runs)
    if not runs:
        parser.error(f"{args.before} holds no run (no checkpoints/last.pt)")
    same = True
    for run in runs:
        if not (args.after / run / "checkpoints" / "last.pt").is_file():
            print(f"{run}: not in {args.after}")
            same = False
            continue
        found = differences(args.before / run, args.after / run)
        saved = load_checkpoint(args.before / run / "checkpoints" / "last.pt")
        elements = sum(t.numel() for part in PARTS for _, t in tensors(saved[part], part))
        print(f"{run}: " + ("identical" if not found else "DIFFERENT") + f" ({elements} checkpoint elements)")
        for line in found[:10]:
            print(f"  {line}")
        same &= not found
    print("all identical" if same else "some differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
