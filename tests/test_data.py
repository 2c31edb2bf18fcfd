"""gvae/data.py, gvae/mnist.py, gvae/synthetic.py: binarization, the seeded split, where MNIST is
found and downloaded, every kind of damaged file, and the synthetic dataset."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from gvae.config import validate
from gvae.data import Binarization, Splits, binarize, load_splits
from gvae.errors import DataError
from gvae.mnist import IDX_FILES
from gvae.mnist import locate_files as locate_mnist
from gvae.mnist import prepare_files as prepare_mnist
from tests.conftest import compose_config

CPU = torch.device("cpu")


def grey_images(n: int = 200, seed: int = 0) -> torch.Tensor:
    """uint8 rows of 784 pixels covering every grey level, 0 and 255 included."""
    images = torch.randint(0, 256, (n, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    images[0, :256] = torch.arange(256, dtype=torch.uint8)
    return images


def splits(mode: Binarization, images: torch.Tensor) -> Splits:
    """Splits built the way load_splits builds them, from small tensors."""
    eval_mode = Binarization.static if mode is Binarization.dynamic else mode
    return Splits(
        train=binarize(images, mode, 0), val=binarize(images, eval_mode, 1),
        test=binarize(images, eval_mode, 2), binarization=mode,
    )


def is_binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


# -----------------------------------------------------------------------------
# binarization modes, on small tensors


def test_threshold_binarization_is_pixel_above_127():
    images = torch.arange(256, dtype=torch.uint8).view(1, 256)
    binary = binarize(images, Binarization.threshold, seed=0)
    assert binary.dtype == torch.uint8
    assert torch.equal(binary, (images.float() / 255 > 0.5).to(torch.uint8))
    assert binary[0, :128].sum() == 0 and binary[0, 128:].sum() == 128  # 127 -> 0, 128 -> 1
    s = splits(Binarization.threshold, images)
    assert torch.equal(s.targets(s.train), binary.float())
    assert torch.equal(s.eval_targets(s.val), binary.float())


def test_static_binarization_is_fixed_by_its_seed_and_differs_from_threshold():
    images = grey_images()
    first = binarize(images, Binarization.static, seed=0)
    assert torch.equal(first, binarize(images, Binarization.static, seed=0))
    assert not torch.equal(first, binarize(images, Binarization.static, seed=1))
    assert not torch.equal(first, binarize(images, Binarization.threshold, seed=0))
    assert is_binary(first)
    assert (first[images == 0] == 0).all() and (first[images == 255] == 1).all()
    # P(pixel = 1) = grey level / 255: over 156,800 pixels the mean is within 0.003 (3 s.e.).
    assert abs(first.float().mean() - images.float().mean() / 255) < 0.003
    s = splits(Binarization.static, images)
    assert torch.equal(s.targets(s.train), s.targets(s.train))  # never resampled


def test_dynamic_binarization_resamples_training_batches_but_not_evaluation_sets():
    images = grey_images()
    s = splits(Binarization.dynamic, images)
    assert torch.equal(s.train, images)  # grey levels kept, binarized per batch
    torch.manual_seed(0)
    first, second = s.targets(s.train), s.targets(s.train)
    assert is_binary(first) and is_binary(second)
    assert first.dtype == torch.float32
    assert (first != second).float().mean() > 0.1  # a fresh draw for the same images
    assert abs(first.mean() - images.float().mean() / 255) < 0.003
    assert is_binary(s.val) and is_binary(s.test)
    assert torch.equal(s.eval_targets(s.val), s.eval_targets(s.val))
    assert torch.equal(s.eval_targets(s.test), s.test.float())


def test_no_binarization_gives_grey_levels_over_255():
    images = grey_images()
    s = splits(Binarization.none, images)
    for x in (s.targets(s.train), s.eval_targets(s.val)):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, images.float() / 255)
        assert x.min() == 0 and x.max() == 1
        assert ((x > 0) & (x < 1)).any()


# -----------------------------------------------------------------------------
# the split, on real MNIST


def load(mnist_root: Path, *overrides: str) -> Splits:
    cfg = compose_config([f"data.root={mnist_root}", *overrides])
    return load_splits(validate(cfg).data, CPU)


def test_load_splits_gives_50000_10000_10000_the_same_way_every_time(mnist_root):
    first, again = load(mnist_root), load(mnist_root)  # static, the default
    for name, n in [("train", 50_000), ("val", 10_000), ("test", 10_000)]:
        a = getattr(first, name)
        assert a.shape == (n, 784) and a.dtype == torch.uint8
        assert is_binary(a)
        assert torch.equal(a, getattr(again, name)), name
    threshold = load(mnist_root, "data.binarization=threshold")
    assert not torch.equal(first.train, threshold.train)
    other_seed = load(mnist_root, "data.split_seed=1")
    assert not torch.equal(first.val, other_seed.val)


def test_train_and_validation_partition_the_official_training_set(mnist_root):
    grey = load(mnist_root, "data.binarization=none")
    official = torchvision.datasets.MNIST(str(prepare_mnist(mnist_root, False)), train=True).data
    # Every one of the 60,000 images is used once: same pixel total, no image repeated.
    total = grey.train.sum(dtype=torch.int64) + grey.val.sum(dtype=torch.int64)
    assert total == official.sum(dtype=torch.int64)
    rows = torch.cat([grey.train, grey.val]).view(60_000, 784)
    assert len(torch.unique(rows, dim=0)) == len(torch.unique(official.view(60_000, 784), dim=0))


def test_dynamic_mode_evaluation_sets_are_binary_and_fixed_across_loads(mnist_root):
    first, again = (load(mnist_root, "data.binarization=dynamic") for _ in range(2))
    assert first.train.max() > 1  # training images keep their grey levels
    for name in ("val", "test"):
        assert is_binary(getattr(first, name))
        assert torch.equal(getattr(first, name), getattr(again, name))


# -----------------------------------------------------------------------------
# preparing the files


def copy_gz(mnist_root: Path, dst_root: Path, names=tuple(IDX_FILES)) -> Path:
    raw = dst_root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in names:
        shutil.copyfile(mnist_root / "MNIST" / "raw" / f"{name}.gz", raw / f"{name}.gz")
    return raw


def test_gz_files_are_extracted_and_loaded_by_torchvision(mnist_root, tmp_path):
    raw = copy_gz(mnist_root, tmp_path)
    root = prepare_mnist(tmp_path, download=False)
    assert root == tmp_path
    for name in IDX_FILES:
        assert (raw / name).is_file(), name
    assert not [p.name for p in raw.iterdir() if "partial" in p.name]  # no temporary file is left
    train = torchvision.datasets.MNIST(str(root), train=True, download=False)
    test = torchvision.datasets.MNIST(str(root), train=False, download=False)
    assert train.data.shape == (60_000, 28, 28) and test.data.shape == (10_000, 28, 28)
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as f:
        assert test.targets.tolist() == list(f.read()[8:])  # labels follow the 8-byte IDX header
    assert prepare_mnist(tmp_path, download=False) == tmp_path  # a second call finds the raw files


def test_missing_data_without_download_says_where_and_how_to_provide_it(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(DataError) as err:
        prepare_mnist(tmp_path, download=False)
    message = str(err.value)
    assert str(raw) in message
    for hint in ("data.root", "GVAE_DATA_DIR", "data.download=true"):
        assert hint in message, hint
    cfg = compose_config([f"data.root={tmp_path}", "data.download=false"])
    with pytest.raises(DataError, match="MNIST not found"):
        load_splits(validate(cfg).data, CPU)


def test_one_missing_file_is_named(mnist_root, tmp_path):
    copy_gz(mnist_root, tmp_path, names=[n for n in IDX_FILES if n != "t10k-labels-idx1-ubyte"])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        prepare_mnist(tmp_path, download=False)


def test_truncated_gz_is_a_clear_error_and_leaves_no_partial_file(mnist_root, tmp_path):
    raw = copy_gz(mnist_root, tmp_path)
    gz = raw / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        prepare_mnist(tmp_path, download=False)
    assert not (raw / "train-labels-idx1-ubyte").exists()
    assert not [p.name for p in raw.iterdir() if "partial" in p.name]


def test_processes_preparing_one_fresh_folder_at_once_all_succeed(mnist_root, gz_copy):
    # Six processes decompress the same four .gz files into the same folder at the same moment:
    # each writes its own temporary file and renames it into place; a file another process has
    # finished is accepted after its checksum is checked. No failure, no false "corrupt" verdict.
    root = gz_copy.parent.parent
    start = root / "go"
    code = (f"import time, pathlib\nwhile not pathlib.Path({str(start)!r}).exists(): time.sleep(0.001)\n"
            f"from gvae.mnist import prepare_files\nprepare_files({str(root)!r}, False)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(6)]
    time.sleep(3)  # every process imported gvae and is waiting
    start.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    for name in IDX_FILES:
        assert (gz_copy / name).read_bytes() == gzip.decompress((gz_copy / f"{name}.gz").read_bytes())
    assert sorted(p.name for p in gz_copy.iterdir()) == sorted([*IDX_FILES, *(f"{n}.gz" for n in IDX_FILES)])


# -----------------------------------------------------------------------------
# where MNIST is found, and downloading it

CLOSED_PORT = "http://127.0.0.1:9/"  # refuses at once: a machine without network, without the wait


@pytest.fixture
def no_data_anywhere(tmp_path, monkeypatch) -> Path:
    """A fresh user: no $GVAE_DATA_DIR, no ./data, an empty per-user cache; returns that cache."""
    monkeypatch.delenv("GVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "cache" / "gvae"


def test_auto_root_is_the_environment_then_local_data_then_cache(mnist_root, no_data_anywhere, monkeypatch):
    assert locate_mnist("auto")[0] == no_data_anywhere
    copy_gz(mnist_root, Path("data"))
    assert locate_mnist("auto")[0] == Path("data")
    monkeypatch.setenv("GVAE_DATA_DIR", str(mnist_root))
    assert locate_mnist("auto")[0] == mnist_root
    assert locate_mnist("/elsewhere")[0] == Path("/elsewhere")  # an explicit data.root is used as given


def test_without_network_the_error_says_where_it_looked_and_what_to_put_where(no_data_anywhere):
    with pytest.raises(DataError) as err:
        prepare_mnist("auto", download=True, mirrors=[CLOSED_PORT])
    message = str(err.value)
    raw = no_data_anywhere / "MNIST" / "raw"
    assert "the download failed" in message and "$GVAE_DATA_DIR (not set)" in message
    files = ", ".join(f"{n}.gz" for n in IDX_FILES)
    assert "./data: no MNIST" in message and f"Put the four files {files}" in message
    assert f"in {raw}/" in message and "GVAE_DATA_DIR=" in message and "data.root=" in message
    assert not (no_data_anywhere.parent).exists()  # nothing was written


def test_missing_mnist_is_downloaded_into_the_cache(mnist_root, no_data_anywhere, monkeypatch, caplog):
    # A local HTTP mirror of the shared copy: its .gz files are compressed differently from the
    # official ones, so torchvision is told their MD5s; gvae's own checks of the IDX contents apply.
    shared = mnist_root / "MNIST" / "raw"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in shared.glob("*.gz")}
    resources = [(name, md5[name]) for name, _ in torchvision.datasets.MNIST.resources]
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shared))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    caplog.set_level("INFO")
    try:
        root = prepare_mnist("auto", download=True, mirrors=[f"http://127.0.0.1:{server.server_port}/"])
    finally:
        server.shutdown()
    raw = no_data_anywhere / "MNIST" / "raw"
    assert root == no_data_anywhere
    assert all((raw / n).is_file() and (raw / f"{n}.gz").is_file() for n in IDX_FILES)
    assert not [p.name for p in raw.iterdir() if "partial" in p.name]
    assert f"MNIST from {raw.resolve()} (the per-user cache" in caplog.text
    splits = load_splits(validate(compose_config(["data.root=auto"])).data, CPU)
    assert len(splits.test) == 10_000


@pytest.mark.slow
def test_gvae_train_without_network_or_data_stops_with_the_data_message_only(no_data_anywhere):
    env = {k: v for k, v in os.environ.items() if k != "GVAE_DATA_DIR"}
    result = subprocess.run([sys.executable, "-m", "gvae.train", f"data.mirrors=[{CLOSED_PORT}]"],
                            env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "MNIST not found" in output and "Traceback" not in output
    assert not no_data_anywhere.parent.exists()  # no data folder was made


# -----------------------------------------------------------------------------
# data faults


def raw_bytes(mnist_root: Path, name: str) -> bytes:
    """The real decompressed IDX file `name`."""
    return gzip.decompress((mnist_root / "MNIST" / "raw" / f"{name}.gz").read_bytes())


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_middle_byte(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def wrong_magic(data: bytes) -> bytes:
    return (2051).to_bytes(4, "big") + data[4:]  # an images header on a labels file


# fault: (the .gz's new contents made from the real IDX file's bytes, words the error must hold)
GZ_FAULTS = {
    "truncated_gz": (lambda raw: truncate(gzip.compress(raw)), "cannot decompress"),
    "not_gzip": (lambda raw: b"PK\x03\x04" + gzip.compress(raw)[4:], "cannot decompress"),
    "damaged_gzip_stream": (lambda raw: flip_middle_byte(gzip.compress(raw)), "cannot decompress"),
    "truncated_idx_in_good_gzip": (lambda raw: gzip.compress(truncate(raw)), "bytes, expected"),
    "wrong_magic_in_good_gzip": (lambda raw: gzip.compress(wrong_magic(raw)), "wrong magic number 2051"),
    "damaged_idx_in_good_gzip": (lambda raw: gzip.compress(flip_middle_byte(raw)), "MD5"),
}


@pytest.mark.parametrize("fault", GZ_FAULTS)
def test_damaged_gz_file_is_named_and_leaves_no_decompressed_file(mnist_root, gz_copy, fault):
    make, words = GZ_FAULTS[fault]
    name = "train-labels-idx1-ubyte"
    (gz_copy / f"{name}.gz").write_bytes(make(raw_bytes(mnist_root, name)))
    with pytest.raises(DataError, match=f"{gz_copy / name}.gz: ") as err:
        prepare_mnist(gz_copy.parent.parent, download=False)
    assert words in str(err.value)
    assert not (gz_copy / name).exists()
    assert not [p.name for p in gz_copy.iterdir() if "partial" in p.name]


# fault: (the IDX file's new contents made from its real bytes, words the error must hold)
RAW_FAULTS = {
    "truncated": (truncate, "bytes, expected"),
    "wrong_magic": (wrong_magic, "wrong magic number 2051, expected 2049"),
    "damaged_contents": (flip_middle_byte, "MD5"),
}


@pytest.mark.parametrize("fault", RAW_FAULTS)
@pytest.mark.parametrize("beside_gz", [True, False], ids=["stale_beside_gz", "alone"])
def test_damaged_idx_file_is_named_and_never_used(mnist_root, gz_copy, fault, beside_gz):
    damage, words = RAW_FAULTS[fault]
    name = "t10k-labels-idx1-ubyte"
    (gz_copy / name).write_bytes(damage(raw_bytes(mnist_root, name)))
    if not beside_gz:
        (gz_copy / f"{name}.gz").unlink()
    with pytest.raises(DataError, match=f"{gz_copy / name}: ") as err:
        prepare_mnist(gz_copy.parent.parent, download=False)
    assert words in str(err.value)
    # Beside its .gz, a stale decompressed copy: the message says how to get a good one.
    assert (f"delete it and gvae will decompress {gz_copy / name}.gz again" in str(err.value)) == beside_gz


# -----------------------------------------------------------------------------
# the synthetic dataset


def test_synthetic_images_are_seeded_and_sized_by_their_config():
    cfg = validate(compose_config(["data=synthetic"])).data
    train, test = cfg.images()
    assert train.shape == (cfg.num_train + cfg.num_val, 144) and test.shape == (cfg.num_test, 144)
    assert set(train.unique().tolist()) <= {0, 255}
    again, _ = cfg.images()
    assert torch.equal(train, again)
    other, _ = validate(compose_config(["data=synthetic", "data.seed=1"])).data.images()
    assert not torch.equal(train, other)


def test_synthetic_images_without_noise_take_one_of_patterns_to_the_tiles_values():
    """The structure a VAE can learn: parts^2 tiles, each one of `patterns` choices."""
    cfg = validate(compose_config(["data=synthetic", "data.noise=0"])).data
    train, _ = cfg.images()
    distinct = train.unique(dim=0)
    assert len(distinct) <= cfg.patterns ** (cfg.parts**2)  # 4^4 = 256 possible images
    assert len(distinct) > 100  # and they are used: 2,500 draws cover most of them
    tiles = train.view(-1, cfg.parts, 6, cfg.parts, 6).permute(0, 1, 3, 2, 4).reshape(-1, 36)
    assert len(tiles.unique(dim=0)) == cfg.patterns  # every tile shows one of the same 4 patterns


def test_synthetic_splits_load_onto_the_device_with_their_sizes():
    splits = load_splits(validate(compose_config(["data=synthetic"])).data, CPU)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2000, 500, 500)
    assert splits.image_shape == (1, 12, 12) and splits.train.dtype == torch.uint8


# -----------------------------------------------------------------------------
# the other MNIST-format datasets: Fashion-MNIST and KMNIST, on small files in their real format

SMALL_COUNTS = (300, 100)  # training and test images of the generated files


def write_idx_set(root: Path, folder: str, seed: int) -> dict[str, str]:
    """Four gzipped IDX files in root/<folder>/raw, as the datasets ship them (big-endian magic number
    and sizes, uint8 rows) but of SMALL_COUNTS images; their MD5s, by .gz name."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    md5s = {}
    for name, (magic, shape) in IDX_FILES.items():
        count = SMALL_COUNTS[0 if name.startswith("train") else 1]
        dims = (count, *shape[1:])
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
        body = torch.randint(0, 256 if len(dims) > 1 else 10, dims, generator=g, dtype=torch.uint8)
        data = gzip.compress(header + body.numpy().tobytes(), mtime=0)
        (raw / f"{name}.gz").write_bytes(data)
        md5s[f"{name}.gz"] = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return md5s


@pytest.fixture(params=["fashion_mnist", "kmnist"])
def small_set(request, tmp_path, monkeypatch) -> tuple[str, Path]:
    """(the data option, a root holding its small files), the option's checksums and counts those files'."""
    import gvae.mnist

    option = request.param
    ds = gvae.mnist.IDX_SETS[option]
    root = tmp_path / "data"
    md5s = write_idx_set(root, ds.folder, seed=len(option))
    small = dataclasses.replace(ds, counts=SMALL_COUNTS, gz_md5=md5s)
    monkeypatch.setitem(gvae.mnist.IDX_SETS, option, small)
    return option, root


def small_run(option: str, root: Path, *more: str) -> list[str]:
    return [f"data={option}", f"data.root={root}", "data.num_train=200", "data.num_val=100",
            "train.batch_size=50", "train.max_steps=20", "train.eval_every=10", "train.ckpt_every=10",
            "model.hidden=[32]", "eval.num_samples=4", "eval.images=false", "device=cpu", *more]


@pytest.mark.slow
def test_fashion_mnist_and_kmnist_train_evaluate_and_resume_like_a_straight_run(small_set, tmp_path):
    from gvae.evaluation import main as gvae_eval
    from gvae.jobs import train

    option, root = small_set
    splits = load_splits(validate(compose_config(small_run(option, root))).data, CPU)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (200, 100, 100)
    assert set(splits.train.unique().tolist()) <= {0, 1}  # fixed binarization, as MNIST's
    straight = train(compose_config(small_run(option, root, "train.max_steps=40")), tmp_path / "straight")
    train(compose_config(small_run(option, root)), tmp_path / "resumed")
    cfg = compose_config(small_run(option, root, "train.max_steps=40", "train.resume=true"))
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed["status"] == "complete" and resumed["val_curve"] == straight["val_curve"]
    assert resumed["test_bound"] == straight["test_bound"]
    (tmp_path / "resumed" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "resumed" / ".hydra" / "config.yaml")  # the record gvae-train writes
    assert gvae_eval([str(tmp_path / "resumed"), "eval.num_samples=8"]) == 0
    assert json.loads((tmp_path / "resumed" / "eval.json").read_text())["step"] == 40


def test_fashion_mnist_and_kmnist_files_are_checked_against_their_checksums(small_set):
    option, root = small_set
    import gvae.mnist

    ds = gvae.mnist.IDX_SETS[option]
    gz = root / ds.folder / "raw" / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(gzip.decompress(gz.read_bytes()), mtime=1))  # the same data, another file
    with pytest.raises(DataError, match=f"{gz}: MD5 .*, expected {ds.folder}'s"):
        prepare_mnist(root, False, ds=ds)


@pytest.mark.parametrize(("option", "folder"), [("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_missing_fashion_mnist_or_kmnist_says_where_and_what_to_put(option, folder, tmp_path):
    cfg = compose_config([f"data={option}", f"data.root={tmp_path}", "data.download=false"])
    with pytest.raises(DataError) as err:
        load_splits(validate(cfg).data, CPU)
    message = str(err.value)
    assert message.startswith(f"{folder} not found: ") and str(tmp_path / folder / "raw") in message
    assert all(hint in message for hint in ("train-images-idx3-ubyte.gz", "data.root", "GVAE_DATA_DIR"))
