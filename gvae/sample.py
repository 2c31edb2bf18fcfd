"""gvae-sample: pictures from a finished run's checkpoint, as PNG files.

    gvae-sample outputs/runs/2026-11-28/10-00-00                 # into the run folder
    gvae-sample RUN --out pictures --num 100 --seed 1 --binary

Writes the run's task's pictures (gvae/tasks/). The VAE's: `prior.png` (images decoded from codes
drawn from the prior), `reconstructions.png` (rows of test images, each followed by a row of their
reconstructions) and `traversal.png` (one test image's most likely code, row v changing variable v
through its values). The structured-output SBN's: `completions.png` (rows of test images, each
followed by a row of them with the lower half drawn from the model given the upper half). Pixels are
Bernoulli means, or with --binary black-and-white images drawn from them. The same run, seed and
options give the same files. `pictures.json` beside them says which state they are of (the
checkpoint's step and checksum) and with which options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

from gvae.config import import_extensions
from gvae.data import load_splits
from gvae.errors import GvaeError
from gvae.files import write_json
from gvae.runs import load_model, run_config

log = logging.getLogger(__name__)


def sample_pictures(run_dir: Path, out: Path, num: int = 64, seed: int = 0, binary: bool = False,
                    image: int = 0, max_vars: int = 16, device: str = "cpu") -> list[Path]:
    """Write the task's PNG files for the run in `run_dir` into `out`, and pictures.json naming the state
    they are of; return the PNG files' paths."""
    cfg = run_config(run_dir, [f"device={device}"])
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):  # found before the work, not after it
        raise GvaeError(f"{out} is not writable: the pictures could not be written there (--out DIR)")
    torch_device = torch.device(device)
    model, step, digest = load_model(run_dir, cfg, torch_device)
    splits = load_splits(cfg.data, torch_device)
    if not 0 <= image < len(splits.test):
        raise GvaeError(f"--image {image} is not allowed: the test set has {len(splits.test)} images")
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    pictures = model.pictures(splits.eval_targets(splits.test), generator, num, binary, image, max_vars)
    paths = []
    for name, grid in pictures.items():
        path = out / model.picture_files[name]
        save_image(grid, path)
        paths.append(path)
    write_json(out / "pictures.json", {"run": str(run_dir), "step": step, "checkpoint_sha256": digest,
                                       "files": [p.name for p in paths], "num": num, "seed": seed,
                                       "binary": binary, "image": image, "max_vars": max_vars})
    log.info("%s (step %d): wrote %s", run_dir, step, ", ".join(str(p) for p in paths))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gvae-sample", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (holds .hydra/ and checkpoints/last.pt)")
    parser.add_argument("--out", type=Path, help="where the PNG files go (default: the run folder)")
    parser.add_argument("--num", type=int, default=64, help="images per grid (64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the codes and binary pixels (0)")
    parser.add_argument("--binary", action="store_true", help="binary images drawn from the pixel means")
    parser.add_argument("--image", type=int, default=0, help="index of the test image to traverse (0)")
    parser.add_argument("--max-vars", type=int, default=16,
                        help="latent variables in the VAE's traversal (16)")
    parser.add_argument("--device", default="cpu", help="cpu (default; same files anywhere) or cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.num < 1 or args.max_vars < 1:
        parser.error("--num and --max-vars must be >= 1")
    try:
        import_extensions()
        sample_pictures(args.run, args.out or args.run, args.num, args.seed, args.binary, args.image,
                        args.max_vars, args.device)
    except (GvaeError, OSError) as e:
        log.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
