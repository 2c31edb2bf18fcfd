"""Training noise as a function of (run seed, step, draw) alone: a counter-based generator.

A run's random numbers must not depend on what else is computed beside it: packed with other runs
(each run its own seed), resumed from a checkpoint, or replayed in a CUDA graph, a run draws the
same numbers. So each uniform is a hash of its run's seed, the training step, the draw's place in
the step (the n-th call for noise in a step) and the element's index: SplitMix64's finalizer
(Steele, Lea & Flood 2014), whose output passes BigCrush, evaluated with int64 tensor arithmetic
(multiplication wraps modulo 2^64). The step is a device tensor that the training step itself
advances, so a captured graph needs nothing from the host.
"""

from __future__ import annotations

import math

import torch


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


_MUL1, _MUL2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)
_GOLDEN = _int64(0x9E3779B97F4A7C15)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (>> on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer: a bijection of 64-bit words with full avalanche."""
    x = (x ^ _shift_right(x, 30)) * _MUL1
    x = (x ^ _shift_right(x, 27)) * _MUL2
    return x ^ _shift_right(x, 31)


class CounterRNG:
    """Uniform noise for `seeds` (one per packed run: shape (S,), or () for a single run).

    uniform(shape) gives float32 in (0, 1) of `shape`, whose leading dimensions are the seeds'
    (a packed run's block of the batch). Call start_step() before a step's draws and advance()
    after them (the training step does both)."""

    def __init__(self, seeds: torch.Tensor | int, device: torch.device, step: int = 0):
        self.seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device)
        self.step = torch.tensor(step, dtype=torch.int64, device=device)
        self.draw = 0
        self._index: dict[tuple[int, ...], torch.Tensor] = {}
        self._golden = torch.tensor(_GOLDEN, dtype=torch.int64, device=device)

    def start_step(self) -> None:
        self.draw = 0

    def advance(self) -> None:
        self.step += 1  # in place: a captured graph advances it on every replay

    def uniform(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        shape = tuple(shape)
        lead = self.seeds.dim()
        if shape[:lead] != tuple(self.seeds.shape):
            raise ValueError(f"noise of shape {shape} for {tuple(self.seeds.shape)} seeds")
        rest = shape[lead:]
        if rest not in self._index:  # the element index, pre-multiplied: the same every step
            index = torch.arange(math.prod(rest), dtype=torch.int64, device=self.seeds.device)
            # By a tensor made outside any compiled code, not by the Python constant: Inductor would
            # fold arange * constant into an index expression that it evaluates without wrapping
            # at 2^64, and fail ("too big to convert to int64_t").
            self._index[rest] = index.view(rest) * self._golden
        key = mix(mix(self.seeds * _GOLDEN + self.step) + self.draw)
        self.draw += 1
        key = key.view(*key.shape, *[1] * len(rest))
        return unit_interval(mix(key + self._index[rest]))


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """float32 in (0, 1) from the top 23 of 64 random bits: (k + 1/2) / 2^23, k < 2^23.

    Both ends are exact in float32 and never 0 or 1 (a Gumbel's log(-log u) sees neither). With 24
    bits the top value, 1 - 2^-25, is not a float32 and rounds to 1: an infinite Gumbel, about
    once per thousand steps of a 20x10 latent at batch 100 (a NaN that once ended a default run)."""
    return (_shift_right(bits, 41).float() + 0.5) * 2.0**-23
