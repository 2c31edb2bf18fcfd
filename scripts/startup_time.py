"""What a command costs before it does anything: gvae-train's help, its printed config and a config
error, side by side with `python -c "import torch"`, which every one of them needs.

    python scripts/startup_time.py --repeats 5

Each command runs in its own process, the four of them taking turns `--repeats` times (so a busy
machine slows them alike); the CPU time (user + system) of each process is read from the operating
system, and the wall time beside it. Prints one JSON line per command with the medians and their
ratio to `import torch`'s, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands(tmp: Path) -> dict[str, list[str]]:
    gvae_train = [sys.executable, "-m", "gvae.train"]
    return {
        "import torch": [sys.executable, "-c", "import torch"],
        "gvae-train --help": [*gvae_train, "--help"],
        "gvae-train --cfg job": [*gvae_train, "--cfg", "job"],
        "config error (optim.lr=-1)": [*gvae_train, "optim.lr=-1", f"hydra.run.dir={tmp / 'refused'}"],
    }


def run(command: list[str]) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, exit status) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - t0, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp))
        cpu: dict[str, list[float]] = {name: [] for name in cmds}
        wall: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.repeats):
            for name, command in cmds.items():
                seconds, elapsed, status = run(command)
                expected = 1 if name.startswith("config error") else 0
                if status != expected:
                    raise SystemExit(f"{name} exited {status}, expected {expected}: {' '.join(command)}")
                cpu[name].append(seconds)
                wall[name].append(elapsed)
    base_cpu, base_wall = statistics.median(cpu["import torch"]), statistics.median(wall["import torch"])
    worst = 0.0
    for name in cmds:
        ratio = statistics.median(cpu[name]) / base_cpu
        worst = max(worst, ratio) if name != "import torch" else worst
        median = statistics.median(cpu[name])
        print(json.dumps({"command": name, "repeats": args.repeats, "cpu_seconds": median,
                          "wall_seconds": statistics.median(wall[name]), "cpu_over_import_torch": ratio,
                          "wall_over_import_torch": statistics.median(wall[name]) / base_wall}),
              flush=True)
    print(json.dumps({"summary": "largest CPU-time ratio to import torch", "ratio": worst,
                      "within_1.5x": worst <= 1.5}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
