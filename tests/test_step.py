"""Speed must not change results: every step mode available here trains like the eager step, and the
captured (CUDA graph) step's logic, run on the CPU through a stand-in for the graph
(tests/graph_standin.py), trains like it too, for one run and for a pack, with every estimator."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config

from gvae.config import StepMode, validate
from gvae.engine import build_engine
from gvae.errors import ConfigError
from gvae.estimators import ESTIMATORS
from gvae.step import resolve_mode
from tests.conftest import SYNTHETIC, TINY, compose_config, estimator_overrides
from tests.graph_standin import StandInGraphs


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
    engine = build_engine([validate(compose_config(overrides))], [None])
    losses = torch.stack([engine.train_step().values for _ in range(STEPS)])
    return losses, [p.detach().clone() for p in engine.runs[0].model.parameters()]


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


# -----------------------------------------------------------------------------
# the captured step's logic on the CPU

LATENT_OPTIONS = {"categorical": ["model.num_vars=3", "model.num_classes=4"],
                  "bernoulli": ["model=bernoulli", "model.num_vars=6"]}
COMBINATIONS = [(name, latent, []) for name in sorted(ESTIMATORS) for latent in LATENT_OPTIONS
                if latent in ESTIMATORS[name].config.latents]
# Options that change what the step computes: a learned control variate, the K-sample objective.
COMBINATIONS += [("rebar", "categorical", ["estimator.learn=true"]),
                 ("rebar", "bernoulli", ["estimator.learn=true"]),
                 ("gumbel_softmax", "categorical", ["task.objective=iwae", "task.samples=3"]),
                 ("st_gumbel_softmax", "bernoulli", ["task.objective=iwae", "task.samples=3"])]
# Two runs that differ in what a pack allows: seed, learning rate and temperature schedule.
PACK = [["seed=0", "optim.lr=1e-3"], ["seed=1", "optim.lr=2e-3", "schedule.tau0=0.7"]]


def _steps(overrides: list[list[str]], graphs, steps: int = 4) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each step's figures and the final parameters of the runs built from `overrides` (one engine:
    a run alone, or a pack), stepped eagerly (graphs None) or captured in the stand-in."""
    mode = "train.compile=graph" if graphs is not None else "train.compile=eager"
    cfgs = [validate(compose_config([*SYNTHETIC, "model.hidden=[16]", mode, *o])) for o in overrides]
    engine = build_engine(cfgs, [None] * len(cfgs), graphs=graphs)
    stats = []
    for step in range(steps):
        if step == 2:  # the temperature moves between replays: the step must read the engine's tensor
            engine.set_tau([0.5 + 0.1 * s for s in range(len(cfgs))])
        stats.append(engine.train_step().values.clone())
    engine.sync_to_runs()
    params = [p.detach().clone() for run in engine.runs for p in run.model.parameters()]
    return torch.stack(stats), params


@pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])
@pytest.mark.parametrize(("name", "latent", "options"), COMBINATIONS)
def test_the_captured_step_trains_like_the_eager_step(name, latent, options, packed):
    """Capture's warm-up steps leave no trace, a replay reads the images copied in and the engine's
    temperature (a scalar alone, (S, 1, ..., 1) packed: the shape a captured pack once got wrong),
    and draws no host synchronisation. The only difference from eager steps is the capturable
    optimizer's arithmetic (its step count on the device), so the figures agree to rounding."""
    runs = [[*estimator_overrides(name), *LATENT_OPTIONS[latent], *options, *o]
            for o in (PACK if packed else PACK[:1])]
    assert_captured_trains_like_eager(runs, rtol=1e-4, stats_atol=1e-4, params_atol=1e-5)


def assert_captured_trains_like_eager(runs: list[list[str]], rtol: float, stats_atol: float,
                                      params_atol: float) -> None:
    """The runs stepped eagerly and captured in the stand-in: four replays, the same figures and final
    parameters to the tolerances, and training that moved the figures."""
    eager_stats, eager_params = _steps(runs, None)
    graphs = StandInGraphs()
    graph_stats, graph_params = _steps(runs, graphs)
    assert graphs.replays == 4
    torch.testing.assert_close(graph_stats, eager_stats, rtol=rtol, atol=stats_atol)
    for a, b in zip(graph_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=params_atol)
    assert not torch.equal(eager_stats[0], eager_stats[-1])  # it did train


BF16_CASES = [("gumbel_softmax", "categorical"), ("straight_through", "bernoulli")]


@pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])
@pytest.mark.parametrize(("name", "latent"), BF16_CASES)
def test_the_captured_step_trains_like_the_eager_step_under_bf16_autocast(name, latent, packed):
    """train.precision=bf16: the loss under autocast with its weight cache off (a captured graph must not
    keep casts made outside it), captured in the stand-in, against the same eager steps. What only CUDA
    has stays untested here, for a reason: TF32 matmuls (set on CUDA only), the graph's private memory
    pool and CUDA's random state (the stand-in saves and restores the CPU's, through the same calls);
    tests/test_step.py's CUDA tests and the estimator tests' captured CUDA step cover them on a GPU."""
    runs = [[*estimator_overrides(name), *LATENT_OPTIONS[latent], "train.precision=bf16", *o]
            for o in (PACK if packed else PACK[:1])]
    assert_captured_trains_like_eager(runs, rtol=1e-3, stats_atol=1e-3, params_atol=1e-4)
