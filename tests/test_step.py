"""Speed must not change results: every step mode available here trains like the eager step."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config

from gvae.errors import ConfigError
from gvae.step import build_training, resolve_mode
from tests.conftest import TINY, compose_config


def _train_losses(mode: str, device: str = "cpu", steps: int = 6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    overrides = [*TINY, f"train.compile={mode}", "seed=3", "data.binarization=dynamic", f"device={device}"]
    cfg = compose_config(overrides)
    run = build_training(cfg)
    losses = torch.stack([run.step(run.sampler.next(), run.tau) for _ in range(steps)])
    return losses, [p.detach().clone() for p in run.model.parameters()]


@pytest.mark.slow
def test_compiled_step_matches_eager_step(mnist_root, monkeypatch):
    # Inductor draws its own random numbers by default; fallback_random makes it use eager's
    # generator, so both steps see the same noise and any difference is the computation's.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    eager_losses, eager_params = _train_losses("eager")
    compiled_losses, compiled_params = _train_losses("compile")
    # Same seed, batches and noise: only kernel fusion and the order of float sums differ.
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-3)
    for a, b in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert not torch.equal(eager_losses[0], eager_losses[-1])  # it did train


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("mode", ["graph", "compile_graph"])
def test_captured_step_matches_eager_step_on_cuda(mnist_root, monkeypatch, mode):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    eager_losses, eager_params = _train_losses("eager", "cuda")
    graph_losses, graph_params = _train_losses(mode, "cuda")
    # TF32 matmuls in both; the capture's warm-up steps must leave no trace in the result.
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-3, atol=1e-2)
    for a, b in zip(graph_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


def test_graph_modes_need_cuda():
    with pytest.raises(ConfigError, match="train.compile='graph'"):
        resolve_mode("graph", torch.device("cpu"))
    assert resolve_mode("auto", torch.device("cpu")) == "eager"
