"""gvae.api: the estimators in a model of one's own, with torch alone; the runnable example in docs/."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gvae import api
from gvae.errors import ConfigError
from gvae.latents import Categorical

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_imports_torch_alone():
    """No Hydra, no OmegaConf, no trainer, no torchvision or TensorBoard: a library a model imports."""
    code = ("import sys, gvae.api; heavy = ('hydra', 'omegaconf', 'torchvision', 'tensorboard', "
            "'gvae.trainer', 'gvae.jobs'); print([m for m in heavy if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_every_estimator_is_made_with_its_typed_options_and_checked():
    assert {"gumbel_softmax", "rloo", "vimco", "relax", "reinmax_rao"} <= set(api.names())
    assert api.options("rloo")().k == 2 and api.cost("rloo") == "k = 2 decoder passes"
    est = api.estimator("rloo", "bernoulli", num_vars=7, k=3)
    assert est.cfg.k == 3 and est.latent.num_vars == 7
    with pytest.raises(ConfigError, match=r"options.k=1 is not allowed: must be >= 2"):
        api.estimator("rloo", "bernoulli", num_vars=7, k=1)
    with pytest.raises(ConfigError, match="disarm is defined for bernoulli latents only"):
        api.estimator("disarm", "categorical", num_vars=2, num_classes=3)
    with pytest.raises(ValueError, match="no estimator 'nope'"):
        api.estimator("nope", "bernoulli", num_vars=2)
    with pytest.raises(ValueError, match="num_classes"):
        api.estimator("gumbel_softmax", "categorical", num_vars=2)


def test_a_reparameterised_sample_and_the_k_sample_bound_through_the_api():
    logits = torch.randn(6, 2, 3, requires_grad=True)
    z = api.estimator("st_gumbel_softmax", "categorical", num_vars=2, num_classes=3).sample(logits, tau=0.5)
    assert ((z == 0) | (z == 1)).all() and torch.equal(z.sum(-1), torch.ones(6, 2))
    (grad,) = torch.autograd.grad((z * torch.arange(3.0)).sum(), logits)
    assert grad.abs().sum() > 0
    vimco = api.estimator("vimco", Categorical(2, 3))
    surrogate, bound = api.k_sample(vimco, logits, 1.0, lambda codes: codes.flatten(1).sum(-1), k=4)
    assert surrogate.shape == bound.shape == (6,)
    with pytest.raises(ValueError, match="single-sample objective"):
        api.k_sample(api.estimator("rloo", Categorical(2, 3)), logits, 1.0, lambda c: c.sum((-2, -1)), k=4)


@pytest.mark.slow
def test_the_example_trains_a_model_of_its_own_with_three_estimators():
    example = runpy.run_path(str(ROOT / "docs" / "examples" / "own_model.py"))
    results = example["main"]()
    assert set(results) == {"st_gumbel_softmax", "rloo", "relax"}
    for name, (before, after) in results.items():
        assert after < 0.6 * before, (name, before, after)
