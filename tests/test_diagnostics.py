"""gvae/diagnostics.py: the references are right, the figures tell a biased estimator from an
unbiased one, and a diagnosed run trains exactly as an undiagnosed one."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gvae.config import DiagConfig, validate
from gvae.diagnostics import diagnose, exact_gradient, local_expectation_gradient
from gvae.estimators import ESTIMATORS
from gvae.jobs import train
from gvae.tasks.vae import VAE
from tests.conftest import SYNTHETIC, compose_config

# Small enough to enumerate: 3 classes x 3 variables (27 codes), or 5 binary units (32 codes).
LATENTS = {"categorical": ["model.num_vars=3", "model.num_classes=3"],
           "bernoulli": ["model=bernoulli", "model.num_vars=5"]}


def small_model(latent: str) -> tuple[VAE, torch.Tensor]:
    cfg = validate(compose_config([*LATENTS[latent], "model.hidden=[16]"]))
    torch.manual_seed(0)
    model = VAE(cfg.model, cfg.data.image_shape)
    return model, (torch.rand(4, cfg.data.num_pixels) < 0.3).float()


def build(name: str, model: VAE):
    return ESTIMATORS[name](model.latent, ESTIMATORS[name].config())


@pytest.mark.parametrize("latent", LATENTS)
def test_the_local_expectation_gradient_is_unbiased_for_the_exact_one(latent):
    model, x = small_model(latent)
    exact = exact_gradient(model, x)
    mean, se = local_expectation_gradient(model, x, draws=4000)
    z = (mean - exact).abs() / (se + 1e-9)
    assert z.max() < 5, z.max()
    assert exact.abs().sum() > 0


@pytest.mark.parametrize("latent", LATENTS)
def test_the_figures_tell_an_unbiased_estimator_from_a_biased_one(latent):
    model, x = small_model(latent)
    cfg = DiagConfig(draws=4000, batch=4)
    unbiased = diagnose(model, build("rebar", model), x, 0.5, cfg)
    biased = diagnose(model, build("straight_through", model), x, 0.5, cfg)
    assert unbiased["reference_error"] == 0.0  # exact: the codes are few
    assert unbiased["bias"] < 3 * unbiased["bias_noise"]  # within its own noise
    assert biased["bias"] > 5 * biased["bias_noise"]  # far outside it
    assert unbiased["cosine"] > 0.95 and 0 < unbiased["variance"] and 0 < unbiased["snr"]


@pytest.mark.slow
def test_diagnosing_during_training_logs_the_figures_and_changes_nothing(tmp_path):
    plain = [*SYNTHETIC, "estimator=score_function", "train.max_steps=40"]
    quiet = train(compose_config(plain), tmp_path / "quiet")
    diag = ["diag.every=20", "diag.draws=8", "diag.batch=4"]
    watched = train(compose_config([*plain, *diag]), tmp_path / "watched")
    # The microscope works on a copy of the estimator and restores the random streams.
    assert watched["val_nelbo"] == quiet["val_nelbo"] and watched["test_bound"] == quiet["test_bound"]
    events = EventAccumulator(str(tmp_path / "watched"))
    events.Reload()
    for name in ("bias", "bias_noise", "variance", "cosine", "snr", "reference_error"):
        assert [e.step for e in events.Scalars(f"grad/{name}")] == [20, 40]
    quiet_events = EventAccumulator(str(tmp_path / "quiet"))
    quiet_events.Reload()
    assert not [t for t in quiet_events.Tags()["scalars"] if t.startswith("grad/")]
    assert json.loads((tmp_path / "watched" / "metrics.json").read_text())["status"] == "complete"
