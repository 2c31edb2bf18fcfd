"""Datasets on the training device: the `data` group's base schema, the seeded split,
binarization and batches.

Each option of the `data` group is a schema (a subclass of DataConfig) that carries its image
shape and sizes and knows how to produce its images; nothing else in gvae writes a pixel count
or an image size. The whole split lives on the device as uint8 and batches are gathered there
from a per-epoch shuffle, so the training loop never waits on a DataLoader or a host-to-device copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
from omegaconf import MISSING

from gvae.errors import DataError, require
from gvae.rng import CounterRNG


class Binarization(str, Enum):
    static = "static"  # sampled once with a fixed seed (the paper's fixed binarization)
    dynamic = "dynamic"  # resampled every training batch
    threshold = "threshold"  # pixel > 0.5
    none = "none"  # grey levels used as Bernoulli targets (the authors' notebook)


@dataclass
class DataConfig:
    """Base schema of the `data` group. `num_train` and `num_val` images are split, with a seeded
    permutation, from the dataset's training images; its test images are the test set."""

    name: str = MISSING
    image_shape: list[int] = field(default_factory=lambda: [1, 28, 28])  # channels, height, width
    num_train: int = 50_000
    num_val: int = 10_000
    binarization: Binarization = Binarization.static
    split_seed: int = 0
    binarize_seed: int = 0

    @property
    def num_pixels(self) -> int:
        return math.prod(self.image_shape)

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(training images, test images) as uint8 rows of grey levels, on the CPU."""
        raise NotImplementedError

    def bytes_needed(self) -> int:
        """What loading the images takes (uint8): for the config's memory check."""
        return (self.num_train + self.num_val) * self.num_pixels

    def check(self, key: str) -> None:
        require(len(self.image_shape) == 3 and all(n >= 1 for n in self.image_shape), f"{key}.image_shape",
                list(self.image_shape), "[channels, height, width], each >= 1")
        require(self.num_train >= 1, f"{key}.num_train", self.num_train, "must be >= 1")
        require(self.num_val >= 8, f"{key}.num_val", self.num_val,
                "must be >= 8 (the validation images' grids show 8 a row)")


@dataclass
class Splits:
    """Images as uint8 rows of pixels on the device, already binarized per the config."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    binarization: Binarization
    image_shape: tuple[int, ...] = (1, 28, 28)
    rng: CounterRNG | None = None  # the trainer's, for dynamic binarization

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Float Bernoulli targets for a batch of training images (dynamic: resampled here)."""
        if self.binarization is Binarization.none:
            return x.float() / 255.0
        if self.binarization is Binarization.dynamic:
            u = self.rng.uniform(x.shape) if self.rng is not None else torch.rand(x.shape, device=x.device)
            return (u * 255.0 < x).float()
        return x.float()

    def eval_targets(self, x: torch.Tensor) -> torch.Tensor:
        """Float targets for validation and test images, which are never resampled."""
        return x.float() / 255.0 if self.binarization is Binarization.none else x.float()


def binarize(images: torch.Tensor, mode: Binarization, seed: int) -> torch.Tensor:
    """uint8 grey levels to uint8 {0, 1}; grey levels are kept for `none` (and `dynamic`)."""
    if mode is Binarization.threshold:
        return (images > 127).to(torch.uint8)  # pixel / 255 > 0.5
    if mode is Binarization.static:
        g = torch.Generator().manual_seed(seed)
        return torch.bernoulli(images.float() / 255.0, generator=g).to(torch.uint8)
    return images


def load_splits(cfg: DataConfig, device: torch.device) -> Splits:
    """The dataset's images, the training images split into train/val with a seeded permutation,
    binarized and moved to the device."""
    full, test = cfg.images()
    if full.shape[1] != cfg.num_pixels or test.shape[1] != cfg.num_pixels:
        raise DataError(f"data.image_shape={list(cfg.image_shape)} ({cfg.num_pixels} pixels) does not match "
                        f"the {full.shape[1]}-pixel images of data={cfg.name}")
    if cfg.num_train + cfg.num_val > len(full):
        raise DataError(f"data.num_train + data.num_val = {cfg.num_train + cfg.num_val} exceeds the "
                        f"{len(full)} training images of data={cfg.name}")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.split_seed))
    train = full[perm[: cfg.num_train]]
    val = full[perm[cfg.num_train : cfg.num_train + cfg.num_val]]
    mode = Binarization(cfg.binarization)
    # Evaluation sets are binarized once even with dynamic training binarization: a test set is fixed.
    eval_mode = Binarization.static if mode is Binarization.dynamic else mode
    seed = cfg.binarize_seed
    return Splits(
        train=binarize(train, mode, seed).to(device),
        val=binarize(val, eval_mode, seed + 1).to(device),
        test=binarize(test, eval_mode, seed + 2).to(device),
        binarization=mode,
        image_shape=tuple(cfg.image_shape),
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
