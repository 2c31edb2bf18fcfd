"""MNIST on the training device: offline preparation, the seeded split, binarization, batches.

The whole split lives on the device as uint8 and batches are gathered there from a per-epoch
shuffle, so the training loop never waits on a DataLoader or a host-to-device copy.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from gvae.config import Binarization, DataConfig
from gvae.errors import DataError

log = logging.getLogger(__name__)

NUM_PIXELS = 784
# IDX files: magic number (big endian) and shape, per torchvision's MNIST file names.
IDX_FILES = {
    "train-images-idx3-ubyte": (2051, (60_000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60_000,)),
    "t10k-images-idx3-ubyte": (2051, (10_000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10_000,)),
}
# MD5 of the decompressed files, MNIST's well-known values: a damaged byte past the header would
# otherwise train on a silently wrong dataset.
IDX_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def idx_problem(path: Path, name: str) -> str | None:
    """What is wrong with `path` as MNIST's IDX file `name` (magic number, shape, length,
    checksum), or None."""
    magic, shape = IDX_FILES[name]
    header_size = 4 * (1 + len(shape))
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        return f"truncated IDX header ({len(header)} of {header_size} bytes)"
    found_magic = int.from_bytes(header[:4], "big")
    if found_magic != magic:
        return f"wrong magic number {found_magic}, expected {magic}"
    found_shape = tuple(int.from_bytes(header[4 * i : 4 * i + 4], "big") for i in range(1, len(shape) + 1))
    if found_shape != shape:
        return f"shape {found_shape} in the header, expected {shape}"
    expected = header_size + int(torch.tensor(shape).prod())
    size = path.stat().st_size
    if size != expected:
        return f"{size} bytes, expected {expected} (truncated or padded file)"
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if (md5 := digest.hexdigest()) != IDX_MD5[name]:
        return f"MD5 {md5}, expected MNIST's {IDX_MD5[name]} (corrupt contents)"
    return None


def check_idx_file(path: Path) -> None:
    """Raise DataError naming `path` unless it is the MNIST IDX file its name says."""
    if problem := idx_problem(path, path.name):
        raise DataError(f"{path}: {problem}")


def _gunzip(src: Path, dst: Path) -> None:
    """Decompress src to dst through a temporary file, checked before it takes dst's name, so a
    failure never leaves a partial or wrong dst behind."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")  # this process's own: others may be at it too
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        tmp.unlink(missing_ok=True)
        raise DataError(f"{src}: cannot decompress ({e}); the gzip file is corrupt or truncated") from e
    if problem := idx_problem(tmp, dst.name):
        tmp.unlink()
        raise DataError(f"{src}: decompresses to a file that is not MNIST's {dst.name}: {problem}")
    os.replace(tmp, dst)


def _check_decompressed(path: Path, gz: Path) -> None:
    """check_idx_file, saying how to recover when the file can be made again from a .gz."""
    if problem := idx_problem(path, path.name):
        hint = f"; delete it and gvae will decompress {gz} again" if gz.exists() else ""
        raise DataError(f"{path}: {problem}{hint}")


def cache_root() -> Path:
    """The per-user cache folder: $XDG_CACHE_HOME/gvae, or ~/.cache/gvae."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gvae"


def missing_files(root: Path) -> list[str]:
    """MNIST's IDX files that are in root/MNIST/raw neither as they are nor gzipped."""
    raw = root / "MNIST" / "raw"
    return [n for n in IDX_FILES if not (raw / n).exists() and not (raw / f"{n}.gz").exists()]


def locate_mnist(root: str | Path) -> tuple[Path, str, list[str]]:
    """(folder holding, or to hold, MNIST/raw/; why that folder; where else was looked).

    data.root=auto (the default) takes the first of $GVAE_DATA_DIR, ./data if it holds MNIST, and
    the per-user cache; any other value is used as it is.
    """
    if str(root) != "auto":
        return Path(root).expanduser(), f"data.root={root}", []
    looked = []
    if env := os.environ.get("GVAE_DATA_DIR"):
        return Path(env).expanduser(), f"$GVAE_DATA_DIR={env}", looked
    looked.append("$GVAE_DATA_DIR (not set)")
    if not missing_files(Path("data")):
        return Path("data"), "./data (it holds MNIST)", looked
    looked.append(f"{Path('data').resolve()} (./data: no MNIST)")
    return cache_root(), "the per-user cache (data.root=auto)", looked


def no_mnist(root: Path, why: str, looked: list[str], missing: list[str], reason: str) -> DataError:
    """The error for MNIST that is not there: where gvae looked, what to put where, how to point at it."""
    raw = root / "MNIST" / "raw"
    where = "; ".join([*looked, f"{raw} ({why})"])
    files = ", ".join(f"{n}.gz" for n in IDX_FILES)
    return DataError(
        f"MNIST not found: {', '.join(missing)} (or .gz) missing in {raw}, and {reason}. Looked in: {where}. "
        f"Put the four files {files} (gzipped or not) in {raw}/, or point gvae at a folder that holds "
        "MNIST/raw/ with GVAE_DATA_DIR=/path/to/folder or data.root=/path/to/folder."
    )


def download_mnist(root: Path, mirrors: list[str] | None = None) -> None:
    """Download MNIST's four files into root/MNIST/raw with torchvision (which checks their MD5),
    from `mirrors` (folder URLs) when given, else from torchvision's.

    Through a private temporary folder, then one rename per file into place: a failed download
    writes nothing, and two processes downloading at once each put complete files in place.
    """
    raw = root / "MNIST" / "raw"
    dataset = torchvision.datasets.MNIST
    if mirrors:
        dataset = type("MNIST", (dataset,), {"mirrors": list(mirrors)})
    with tempfile.TemporaryDirectory(prefix="gvae-mnist-") as tmp:
        dataset(tmp, train=True, download=True)
        raw.mkdir(parents=True, exist_ok=True)
        for name in IDX_FILES:
            for file in (f"{name}.gz", name):
                staged = raw / f".{file}.{os.getpid()}.partial"
                # A copy, not a rename: the temporary folder may be on another disk.
                shutil.copyfile(Path(tmp) / "MNIST" / "raw" / file, staged)
                os.replace(staged, raw / file)


def prepare_mnist(root: str | Path, download: bool, mirrors: list[str] | None = None) -> Path:
    """Return a folder that torchvision.datasets.MNIST can read without downloading.

    `root` as data.root takes it (see locate_mnist). Missing files are downloaded when `download`
    is on. torchvision accepts only its own downloads' checksums, so `.gz` files are decompressed
    next to themselves first (or into the per-user cache when that folder is read-only). Every
    file is checked, including decompressed copies left by an earlier run.
    """
    root, why, looked = locate_mnist(root)
    raw = root / "MNIST" / "raw"
    if missing := missing_files(root):
        if not download:
            raise no_mnist(root, why, looked, missing, "data.download=false (data.download=true fetches it)")
        log.info("MNIST is not in %s (%s): downloading it there", raw, why)
        try:
            download_mnist(root, mirrors)
        except (RuntimeError, OSError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            detail = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "")
            reason = f"the download failed ({detail})"
            raise no_mnist(root, why, looked, missing, reason) from None
    log.info("MNIST from %s (%s)", raw.resolve(), why)
    target = root
    if any(not (raw / n).exists() for n in IDX_FILES) and not os.access(raw, os.W_OK):
        target = cache_root()
        log.info("%s is read-only: decompressing MNIST into %s", raw, target)
    target_raw = target / "MNIST" / "raw"
    target_raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        src, gz, dst = raw / name, raw / f"{name}.gz", target_raw / name
        if dst.exists():
            _check_decompressed(dst, gz)
        elif src.exists():
            check_idx_file(src)
            staged = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
            shutil.copyfile(src, staged)
            os.replace(staged, dst)
        else:
            _gunzip(gz, dst)
    return target


@dataclass
class Splits:
    """Images as uint8 rows of 784 pixels on the device, already binarized per the config."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    binarization: Binarization

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Float Bernoulli targets for a batch of training images (dynamic: resampled here)."""
        if self.binarization is Binarization.none:
            return x.float() / 255.0
        if self.binarization is Binarization.dynamic:
            return (torch.rand(x.shape, device=x.device) * 255.0 < x).float()
        return x.float()

    def eval_targets(self, x: torch.Tensor) -> torch.Tensor:
        """Float targets for validation and test images, which are never resampled."""
        return x.float() / 255.0 if self.binarization is Binarization.none else x.float()


def _binarize(images: torch.Tensor, mode: Binarization, seed: int) -> torch.Tensor:
    """uint8 grey levels to uint8 {0, 1}; grey levels are kept for `none` (and `dynamic`)."""
    if mode is Binarization.threshold:
        return (images > 127).to(torch.uint8)  # pixel / 255 > 0.5
    if mode is Binarization.static:
        g = torch.Generator().manual_seed(seed)
        return torch.bernoulli(images.float() / 255.0, generator=g).to(torch.uint8)
    return images


def load_splits(cfg: DataConfig, device: torch.device) -> Splits:
    """Load MNIST, split 60k into train/val with a seeded permutation, binarize, move to device."""
    root = prepare_mnist(cfg.root, cfg.download, list(cfg.mirrors))
    train_set = torchvision.datasets.MNIST(str(root), train=True, download=False)
    test_set = torchvision.datasets.MNIST(str(root), train=False, download=False)
    full, test = train_set.data.reshape(-1, NUM_PIXELS), test_set.data.reshape(-1, NUM_PIXELS)
    if cfg.num_train + cfg.num_val > len(full):
        raise DataError(
            f"data.num_train + data.num_val = {cfg.num_train + cfg.num_val} exceeds the {len(full)} "
            "MNIST training images"
        )
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.split_seed))
    train = full[perm[: cfg.num_train]]
    val = full[perm[cfg.num_train : cfg.num_train + cfg.num_val]]
    mode = Binarization(cfg.binarization)
    # Evaluation sets are binarized once even with dynamic training binarization: a test set is fixed.
    eval_mode = Binarization.static if mode is Binarization.dynamic else mode
    seed = cfg.binarize_seed
    return Splits(
        train=_binarize(train, mode, seed).to(device),
        val=_binarize(val, eval_mode, seed + 1).to(device),
        test=_binarize(test, eval_mode, seed + 2).to(device),
        binarization=mode,
    )


class BatchSampler:
    """Draws training batches on the device, one reshuffle per epoch (the last partial batch is dropped)."""

    def __init__(self, data: torch.Tensor, batch_size: int, seed: int):
        if batch_size > len(data):
            raise ValueError(f"train.batch_size={batch_size} exceeds the {len(data)} training images")
        self.data, self.batch_size = data, batch_size
        self.batches_per_epoch = len(data) // batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch_start_state = self.generator.get_state()
        perm = torch.randperm(len(self.data), generator=self.generator)
        self.perm = perm.to(self.data.device)
        self.position = 0

    def next_indices(self) -> torch.Tensor:
        """Indices of the next batch, a device tensor."""
        if self.position == self.batches_per_epoch:
            self._new_epoch()
        i = self.position * self.batch_size
        self.position += 1
        return self.perm[i : i + self.batch_size]

    def next(self) -> torch.Tensor:
        """The next batch of uint8 images."""
        return self.data[self.next_indices()]

    def state_dict(self) -> dict:
        return {"epoch_start_state": self.epoch_start_state, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["epoch_start_state"])
        self._new_epoch()
        self.position = int(state["position"])
