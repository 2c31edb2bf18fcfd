"""MNIST-format datasets' files: where they are, downloading them, checking them; and the options
`data=mnist`, `data=fashion_mnist` and `data=kmnist` (Fashion-MNIST, Xiao et al. 2017; Kuzushiji-MNIST,
Clanuwat et al. 2018), each four IDX files in ROOT/<its torchvision class>/raw/ read by torchvision's
class of that name.

Every file is checked against its dataset's header and size, and against a published MD5 whatever its
source, because a damaged byte past the header would otherwise train on a silently wrong dataset:
MNIST's decompressed files against their well-known MD5s; Fashion-MNIST's and KMNIST's `.gz` files
against the MD5s torchvision publishes for them (no MD5 of their decompressed files is published, so a
decompressed file given without its `.gz` is checked by its header and size alone, and the log says so).
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

from gvae.data import DataConfig
from gvae.errors import DataError, require
from gvae.files import staged
from gvae.roles import LOCATION, role_field

log = logging.getLogger(__name__)

MNIST_TRAIN_IMAGES = 60_000
# IDX files: magic number (big endian) and shape, per torchvision's MNIST file names (the same in every
# MNIST-format dataset; the image counts are each dataset's, IDXSet.counts).
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


@dataclass(frozen=True)
class IDXSet:
    """An MNIST-format dataset: the four IDX files, gzipped or not, in ROOT/<folder>/raw/, read by
    torchvision's class named `folder`; `counts`: its training and test images; `idx_md5`: the MD5s of
    its decompressed files, where published; `gz_md5`: those of its .gz files (torchvision's)."""

    folder: str
    counts: tuple[int, int] = (60_000, 10_000)
    idx_md5: dict[str, str] | None = None
    gz_md5: dict[str, str] | None = None

    def shape(self, name: str) -> tuple[int, tuple[int, ...]]:
        """The IDX file `name`'s magic number and shape."""
        magic, shape = IDX_FILES[name]
        return magic, (self.counts[0 if name.startswith("train") else 1], *shape[1:])


def _gz(md5s: list[str]) -> dict[str, str]:
    return {f"{name}.gz": md5 for name, md5 in zip(IDX_FILES, md5s, strict=True)}


IDX_SETS = {
    "mnist": IDXSet("MNIST", idx_md5=IDX_MD5),
    # torchvision's FashionMNIST.resources and KMNIST.resources
    "fashion_mnist": IDXSet("FashionMNIST", gz_md5=_gz([
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"])),
    "kmnist": IDXSet("KMNIST", gz_md5=_gz([
        "bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
        "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"])),
}
MNIST = IDX_SETS["mnist"]


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def idx_problem(path: Path, name: str, ds: IDXSet = MNIST) -> str | None:
    """What is wrong with `path` as the dataset's IDX file `name` (magic number, shape, length,
    checksum where one is published), or None."""
    magic, shape = ds.shape(name)
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
    if ds.idx_md5 is not None and (md5 := md5_of(path)) != ds.idx_md5[name]:
        return f"MD5 {md5}, expected {ds.folder}'s {ds.idx_md5[name]} (corrupt contents)"
    return None


def check_idx_file(path: Path, ds: IDXSet = MNIST) -> None:
    """Raise DataError naming `path` unless it is the dataset's IDX file its name says."""
    if problem := idx_problem(path, path.name, ds):
        raise DataError(f"{path}: {problem}")


def _gunzip(src: Path, dst: Path, ds: IDXSet) -> None:
    """Decompress src to dst through a temporary file, checked before it takes dst's name, so a
    failure never leaves a partial or wrong dst behind (a .gz with a published MD5 is checked first)."""
    if ds.gz_md5 is not None and (md5 := md5_of(src)) != ds.gz_md5[src.name]:
        raise DataError(f"{src}: MD5 {md5}, expected {ds.folder}'s {ds.gz_md5[src.name]} (corrupt or another "
                        "dataset's file)")
    with staged(dst) as tmp:  # this call's own file: other processes may be decompressing it too
        try:
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{src}: cannot decompress ({e}); the gzip file is corrupt or truncated") from e
        if problem := idx_problem(tmp, dst.name, ds):
            raise DataError(f"{src}: decompresses to a file that is not {ds.folder}'s {dst.name}: {problem}")


def _check_decompressed(path: Path, gz: Path, ds: IDXSet) -> None:
    """check_idx_file, saying how to recover when the file can be made again from a .gz."""
    if problem := idx_problem(path, path.name, ds):
        hint = f"; delete it and gvae will decompress {gz} again" if gz.exists() else ""
        raise DataError(f"{path}: {problem}{hint}")


def cache_root() -> Path:
    """The per-user cache folder: $XDG_CACHE_HOME/gvae, or ~/.cache/gvae."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gvae"


def missing_files(root: Path, ds: IDXSet = MNIST) -> list[str]:
    """The dataset's IDX files that are in root/<folder>/raw neither as they are nor gzipped."""
    raw = root / ds.folder / "raw"
    return [n for n in IDX_FILES if not (raw / n).exists() and not (raw / f"{n}.gz").exists()]


def locate_files(root: str | Path, ds: IDXSet = MNIST) -> tuple[Path, str, list[str]]:
    """(folder holding, or to hold, <folder>/raw/; why that folder; where else was looked).

    data.root=auto (the default) takes the first of $GVAE_DATA_DIR, ./data if it holds the dataset,
    and the per-user cache; any other value is used as it is.
    """
    if str(root) != "auto":
        return Path(root).expanduser(), f"data.root={root}", []
    looked = []
    if env := os.environ.get("GVAE_DATA_DIR"):
        return Path(env).expanduser(), f"$GVAE_DATA_DIR={env}", looked
    looked.append("$GVAE_DATA_DIR (not set)")
    if not missing_files(Path("data"), ds):
        return Path("data"), f"./data (it holds {ds.folder})", looked
    looked.append(f"{Path('data').resolve()} (./data: no {ds.folder})")
    return cache_root(), "the per-user cache (data.root=auto)", looked


def not_found(root: Path, why: str, looked: list[str], missing: list[str], reason: str,
              ds: IDXSet = MNIST) -> DataError:
    """The error for a dataset that is not there: where gvae looked, what to put where, how to point at it."""
    raw = root / ds.folder / "raw"
    where = "; ".join([*looked, f"{raw} ({why})"])
    files = ", ".join(f"{n}.gz" for n in IDX_FILES)
    return DataError(
        f"{ds.folder} not found: {', '.join(missing)} (or .gz) missing in {raw}, and {reason}. Looked in: "
        f"{where}. Put the four files {files} (gzipped or not) in {raw}/, or point gvae at a folder that "
        f"holds {ds.folder}/raw/ with GVAE_DATA_DIR=/path/to/folder or data.root=/path/to/folder."
    )


def download_files(root: Path, mirrors: list[str] | None = None, ds: IDXSet = MNIST) -> None:
    """Download the dataset's four files into root/<folder>/raw with torchvision (which checks their
    MD5), from `mirrors` (folder URLs) when given, else from torchvision's.

    Through a private temporary folder, then one rename per file into place: a failed download
    writes nothing, and two processes downloading at once each put complete files in place.
    """
    raw = root / ds.folder / "raw"
    import torchvision  # here: it brings its models and ops, seconds that only reading the files needs

    dataset = getattr(torchvision.datasets, ds.folder)
    if mirrors:
        dataset = type(ds.folder, (dataset,), {"mirrors": list(mirrors)})
    with tempfile.TemporaryDirectory(prefix="gvae-data-") as tmp:
        dataset(tmp, train=True, download=True)
        raw.mkdir(parents=True, exist_ok=True)
        for name in IDX_FILES:
            for file in (f"{name}.gz", name):
                with staged(raw / file) as part:  # a copy: the temporary folder may be on another disk
                    shutil.copyfile(Path(tmp) / ds.folder / "raw" / file, part)


def prepare_files(root: str | Path, download: bool, mirrors: list[str] | None = None,
                  ds: IDXSet = MNIST) -> Path:
    """Return a folder that torchvision's class for the dataset can read without downloading.

    `root` as data.root takes it (see locate_files). Missing files are downloaded when `download`
    is on. torchvision accepts only its own downloads' checksums, so `.gz` files
    are decompressed next to themselves first (or into the per-user cache when that folder is
    read-only). Every file is checked, including decompressed copies left by an earlier run.
    """
    root, why, looked = locate_files(root, ds)
    raw = root / ds.folder / "raw"
    if missing := missing_files(root, ds):
        if not download:
            reason = "data.download=false (data.download=true fetches it)"
            raise not_found(root, why, looked, missing, reason, ds)
        log.info("%s is not in %s (%s): downloading it there", ds.folder, raw, why)
        try:
            download_files(root, mirrors, ds)
        except (RuntimeError, OSError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            detail = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "")
            raise not_found(root, why, looked, missing, f"the download failed ({detail})", ds) from None
    log.info("%s from %s (%s)", ds.folder, raw.resolve(), why)
    target = root
    if any(not (raw / n).exists() for n in IDX_FILES) and not os.access(raw, os.W_OK):
        target = cache_root()
        log.info("%s is read-only: decompressing %s into %s", raw, ds.folder, target)
    target_raw = target / ds.folder / "raw"
    target_raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        src, gz, dst = raw / name, raw / f"{name}.gz", target_raw / name
        if dst.exists():
            _check_decompressed(dst, gz, ds)
        elif src.exists():
            check_idx_file(src, ds)
            with staged(dst) as part:
                shutil.copyfile(src, part)
        else:
            _gunzip(gz, dst, ds)
        if ds.idx_md5 is None and not gz.exists():
            log.info("%s: no MD5 of %s's decompressed files is published; checked by header and size only",
                     dst, ds.folder)
    return target


@dataclass
class MNISTConfig(DataConfig):
    """`data=mnist`: the official 60,000 training images split into train and validation, and the
    official 10,000 test images (the options below share it: other MNIST-format datasets)."""

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

    @property
    def dataset(self) -> IDXSet:
        return IDX_SETS[self.name]

    def check(self, key: str) -> None:
        super().check(key)
        ds = self.dataset
        require(list(self.image_shape) == [1, 28, 28], f"{key}.image_shape", list(self.image_shape),
                f"{ds.folder}'s images are [1, 28, 28]")
        require(self.num_train + self.num_val <= ds.counts[0], f"{key}.num_train", self.num_train,
                f"{key}.num_train + {key}.num_val (={self.num_val}) must be <= {ds.counts[0]}, "
                f"{ds.folder}'s training images")

    def bytes_needed(self) -> int:
        return sum(self.dataset.counts) * self.num_pixels  # every image is read

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision  # here: it brings its models and ops, seconds that only reading the files needs

        ds = self.dataset
        root = prepare_files(self.root, self.download, list(self.mirrors), ds)
        dataset = getattr(torchvision.datasets, ds.folder)
        train = dataset(str(root), train=True, download=False).data
        test = dataset(str(root), train=False, download=False).data
        return train.reshape(len(train), -1), test.reshape(len(test), -1)


@dataclass
class FashionMNISTConfig(MNISTConfig):
    """`data=fashion_mnist`: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), 28x28 grey images of 10
    kinds of clothing, split as MNIST is."""

    name: str = "fashion_mnist"


@dataclass
class KMNISTConfig(MNISTConfig):
    """`data=kmnist`: Kuzushiji-MNIST (Clanuwat et al. 2018), 28x28 grey images of 10 cursive Japanese
    characters, split as MNIST is."""

    name: str = "kmnist"
