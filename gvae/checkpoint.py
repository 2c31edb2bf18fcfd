"""Checkpoints: one dict per file, written atomically, read back with weights_only=True."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file, flush it to disk, then rename: a kill mid-save leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects (tensors and plain containers only)."""
    return torch.load(path, map_location=device, weights_only=True)
