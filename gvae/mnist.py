"""MNIST's files: where they are, downloading them, checking them; and the `data=mnist` option.

Every file is checked against MNIST's known header, size and MD5 whatever its source, because a
damaged byte past the header would otherwise train on a silently wrong dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision

from gvae.data import DataConfig
from gvae.errors import DataError, require
from gvae.files import staged
from gvae.roles import LOCATION, role_field

log = logging.getLogger(__name__)

MNIST_TRAIN_IMAGES = 60_000
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
    with staged(dst) as tmp:  # this call's own file: other processes may be decompressing it too
        try:
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{src}: cannot decompress ({e}); the gzip file is corrupt or truncated") from e
        if problem := idx_problem(tmp, dst.name):
            raise DataError(f"{src}: decompresses to a file that is not MNIST's {dst.name}: {problem}")


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
                with staged(raw / file) as part:  # a copy: the temporary folder may be on another disk
                    shutil.copyfile(Path(tmp) / "MNIST" / "raw" / file, part)


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
            with staged(dst) as part:
                shutil.copyfile(src, part)
        else:
            _gunzip(gz, dst)
    return target


@dataclass
class MNISTConfig(DataConfig):
    """`data=mnist`: the official 60,000 training images split into train and validation, and the
    official 10,000 test images."""

    name: str = "mnist"
    image_shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    num_train: int = 50_000
    num_val: int = 10_000
    # Where the files are found or fetched: not what a run computes (roles.LOCATION).
    # $GVAE_DATA_DIR, else ./data if it holds MNIST, else the per-user cache
    root: str = role_field(LOCATION, "auto")
    download: bool = role_field(LOCATION, True)  # fetch MNIST with torchvision when it is missing
    # folder URLs to download from; empty: torchvision's
    mirrors: list[str] = role_field(LOCATION, default_factory=list)

    def check(self, key: str) -> None:
        super().check(key)
        require(list(self.image_shape) == [1, 28, 28], f"{key}.image_shape", list(self.image_shape),
                "MNIST's images are [1, 28, 28]")
        require(self.num_train + self.num_val <= MNIST_TRAIN_IMAGES, f"{key}.num_train", self.num_train,
                f"{key}.num_train + {key}.num_val (={self.num_val}) must be <= {MNIST_TRAIN_IMAGES}, "
                "MNIST's training images")

    def bytes_needed(self) -> int:
        return (MNIST_TRAIN_IMAGES + 10_000) * self.num_pixels  # every image is read

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        root = prepare_mnist(self.root, self.download, list(self.mirrors))
        train = torchvision.datasets.MNIST(str(root), train=True, download=False).data
        test = torchvision.datasets.MNIST(str(root), train=False, download=False).data
        return train.reshape(len(train), -1), test.reshape(len(test), -1)
