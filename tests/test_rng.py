"""The counter-based training noise (gvae/rng.py): its range, its distribution, its independence
of what is computed beside it."""

import math

import pytest
import torch

from gvae.latents import Bernoulli, Categorical
from gvae.rng import CounterRNG, unit_interval


def _bits(unsigned: list[int]) -> torch.Tensor:
    return torch.tensor([u - (1 << 64) if u >= (1 << 63) else u for u in unsigned], dtype=torch.int64)


def test_every_bit_pattern_maps_strictly_inside_the_unit_interval():
    # The extremes of the 64-bit words and of the bits that are kept (the top 23).
    words = [0, 1, (1 << 41) - 1, 1 << 41, (1 << 63) - 1, 1 << 63, (1 << 64) - (1 << 41), (1 << 64) - 1]
    u = unit_interval(_bits(words))
    assert u.dtype == torch.float32
    assert (u > 0).all() and (u < 1).all(), u
    assert u.max().item() == 1 - 2.0**-24 and u.min().item() == 2.0**-24
    # The noise built on the extremes is finite, even at a low temperature.
    for latent in (Categorical(len(words), 1), Bernoulli(len(words))):
        latent.rng = None
        g = -torch.log(-torch.log(u)) if isinstance(latent, Categorical) else torch.log(u) - torch.log1p(-u)
        assert torch.isfinite(g).all()
        assert torch.isfinite(latent.relax(g.view(1, *latent.shape), 0.1)).all()


def test_uniforms_are_uniform_and_uncorrelated():
    rng = CounterRNG(7, torch.device("cpu"), step=123)
    rng.start_step()
    u = rng.uniform((400_000,))
    v = rng.uniform((400_000,))  # the next draw of the same step
    n = u.numel()
    # Mean and variance of U(0,1) (1/2, 1/12), within 5 standard errors.
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    # 100 equal bins: chi-square with 99 degrees of freedom; 99 + 5 sd = 169.
    counts = torch.histc(u, bins=100, min=0, max=1)
    chi2 = ((counts - n / 100) ** 2 / (n / 100)).sum().item()
    assert chi2 < 169, chi2
    # Neighbouring elements and consecutive draws are uncorrelated.
    for a, b in ((u[:-1], u[1:]), (u, v)):
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(n), r


def test_gumbel_argmax_frequencies_match_softmax():
    latent = Categorical(1, 5)
    latent.rng = CounterRNG(3, torch.device("cpu"))
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).expand(100_000, 1, 5)
    latent.rng.start_step()
    z = latent.harden(logits + latent.noise(logits)).sum(dim=(0, 1))
    expected = torch.softmax(logits[0, 0], -1) * logits.shape[0]
    chi2 = ((z - expected) ** 2 / expected).sum().item()
    assert chi2 < 4 + 5 * math.sqrt(8), chi2  # 4 degrees of freedom


def test_numbers_depend_only_on_seed_step_and_draw():
    packed = CounterRNG([5, 9, 5], torch.device("cpu"), step=40)
    alone = CounterRNG(9, torch.device("cpu"), step=40)
    for rng in (packed, alone):
        rng.start_step()
    first_p, second_p = packed.uniform((3, 4, 6)), packed.uniform((3, 2))
    first_a, second_a = alone.uniform((4, 6)), alone.uniform((2,))
    # A run's block of a pack is what it draws alone; equal seeds draw equal numbers.
    assert torch.equal(first_p[1], first_a) and torch.equal(second_p[1], second_a)
    assert torch.equal(first_p[0], first_p[2])
    assert not torch.equal(first_p[0], first_p[1])
    # The next step draws new numbers; coming back to a step (a resumed run) draws the same.
    alone.advance()
    alone.start_step()
    assert not torch.equal(alone.uniform((4, 6)), first_a)
    again = CounterRNG(9, torch.device("cpu"), step=40)
    again.start_step()
    assert torch.equal(again.uniform((4, 6)), first_a)


def test_shape_must_lead_with_the_seeds():
    rng = CounterRNG([1, 2], torch.device("cpu"))
    with pytest.raises(ValueError, match="seeds"):
        rng.uniform((3, 4))
