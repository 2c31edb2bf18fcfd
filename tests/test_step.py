"""Speed must not change results: every step mode available here trains like the eager step."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config

from gvae.config import StepMode
from gvae.errors import ConfigError
from gvae.step import resolve_mode
from gvae.train import build_training
from tests.conftest import TINY, compose_config


@pytest.fixture
def fallback_random():
    """Inductor draws its own random numbers by default; fallback_random makes it use eager's
    generator, so both steps see the same noise and any difference is the computation's. (The
    config's own patch(): monkeypatching an inductor config entry breaks it for later tests.)"""
    with torch._inductor.config.patch(fallback_random=True):
        yield


STEPS, LR = 6, 1e-3  # Adam's default learning rate in configs/optim/adam.yaml


def _train_losses(
    mode: str, device: str = "cpu", binarization: str = "dynamic"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    overrides = [*TINY, f"train.compile={mode}", "seed=3", f"data.binarization={binarization}",
                 f"device={device}", f"optim.lr={LR}"]
    cfg = compose_config(overrides)
    run = build_training(cfg)
    losses = torch.stack([run.step(run.sampler.next(), run.tau).values for _ in range(STEPS)])
    return losses, [p.detach().clone() for p in run.model.parameters()]


def assert_same_parameters(params: list[torch.Tensor], reference: list[torch.Tensor], rtol: float,
                           atol: float) -> None:
    """Parameters after STEPS Adam steps of two computations that differ only in float rounding.

    Adam divides each gradient by its own running RMS, so an element whose gradient is at rounding
    level moves by up to about LR per step in either direction: a few such elements may differ by
    up to 2 * LR * STEPS while all others agree to rounding. Anything wrong in the step (another
    batch, other noise, a stale update) moves far more elements than 1 in 1000.
    """
    a, b = torch.cat([p.flatten() for p in params]), torch.cat([p.flatten() for p in reference])
    far = ((a - b).abs() > atol + rtol * b.abs()).float().mean().item()
    assert far <= 1e-3, f"{far:.2%} of parameter elements differ beyond rounding"
    assert (a - b).abs().max().item() <= 2 * LR * STEPS


@pytest.mark.slow
def test_compiled_step_matches_eager_step(mnist_root, fallback_random):
    torch._dynamo.reset()
    # Static binarization: the only random numbers in the compiled loss are then the latent's
    # torch.rand, which fallback_random routes through eager's generator on every torch release
    # (torch 2.11's CPU inductor lowered a bernoulli draw differently from eager).
    eager_losses, eager_params = _train_losses("eager", binarization="static")
    compiled_losses, compiled_params = _train_losses("compile", binarization="static")
    # Same seed, batches and noise: only kernel fusion and the order of float sums differ.
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-3)
    assert_same_parameters(compiled_params, eager_params, rtol=1e-3, atol=1e-4)
    assert not torch.equal(eager_losses[0], eager_losses[-1])  # it did train


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("mode", ["graph", "compile_graph"])
def test_captured_step_matches_eager_step_on_cuda(mnist_root, fallback_random, mode):
    torch._dynamo.reset()
    eager_losses, eager_params = _train_losses("eager", "cuda")
    graph_losses, graph_params = _train_losses(mode, "cuda")
    # TF32 matmuls in both; the capture's warm-up steps must leave no trace in the result, and
    # each call's losses are its own (a replay must not overwrite what an earlier call returned).
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-3, atol=1e-2)
    assert not torch.equal(graph_losses[0], graph_losses[-1])
    assert_same_parameters(graph_params, eager_params, rtol=1e-2, atol=1e-3)


def test_graph_modes_need_cuda():
    with pytest.raises(ConfigError, match="train.compile='graph'"):
        resolve_mode("graph", torch.device("cpu"))
    assert resolve_mode("auto", torch.device("cpu")) is StepMode.eager
