"""The structured-output task (task=sbn, gvae/tasks/sbn.py): its figures are what they claim, checked
against p(x_lower | x_upper) summed exactly over every code of a small SBN; its estimators' chained
gradients are unbiased where the estimator is; and it goes through every path the VAE does: trained
by gvae-train with every estimator, resumed after a kill, packed, evaluated by gvae-eval, drawn by
gvae-sample, diagnosed by the microscope, placed in the table."""

from __future__ import annotations

import itertools
import json
import math
import signal

import pytest
import torch
from PIL import Image

from gvae.checkpoint import load_checkpoint
from gvae.config import validate
from gvae.diagnostics import local_expectation_gradient, reference_gradient
from gvae.errors import ConfigError, Interrupted
from gvae.estimators import ESTIMATORS, ScoreFunctionBase
from gvae.evaluation import main as gvae_eval
from gvae.evaluation import multi_sample_bounds, negative_elbo
from gvae.jobs import train
from gvae.objective import recon_nll
from gvae.sample import main as gvae_sample
from gvae.table import row_label
from gvae.tasks import build_task
from gvae.tasks.base import Objective
from gvae.tasks.sbn import SBN
from tests.conftest import SYNTHETIC, compose_config, estimator_overrides, gvae_train
from tests.test_train import assert_same_state, with_step_hook

LATENTS = {"categorical": ["model.num_vars=2", "model.num_classes=3"],
           "bernoulli": ["model=bernoulli", "model.num_vars=3"]}
COMBINATIONS = [(name, latent) for name in sorted(ESTIMATORS) for latent in LATENTS
                if latent in ESTIMATORS[name].config.latents]
SBN_RUN = [*SYNTHETIC, "task=sbn", "eval.images=true"]


def small_sbn(latent: str, seed: int = 0) -> tuple[SBN, torch.Tensor]:
    """A 2-layer SBN on 12x12 images (72 pixels a half) with 9 or 8 codes a layer, and one image."""
    cfg = validate(compose_config([*SYNTHETIC, "task=sbn", *LATENTS[latent]]))
    torch.manual_seed(seed)
    model = build_task(cfg)
    with torch.no_grad():  # logits large enough that the layers matter
        for p in model.parameters():
            p.mul_(3.0)
    x = (torch.rand(1, cfg.data.num_pixels, generator=torch.Generator().manual_seed(seed)) < 0.4).float()
    return model, x


def every_code(latent) -> torch.Tensor:
    values = itertools.product(range(latent.num_values), repeat=latent.num_vars)
    code = torch.zeros(1, *latent.shape)
    return torch.cat([_code(latent, code, v) for v in values])


def _code(latent, code, values):
    for var, k in enumerate(values):
        code = latent.one_value(code, var, k)
    return code


def exact(model: SBN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (-log p(x_lower | x_upper), E_h[-log p(x_lower | h)]), summing over every code of
    both layers; differentiable in the parameters."""
    upper, lower = model.halves(x)
    first, second = model.latents
    codes1, codes2 = every_code(first), every_code(second)
    log_q1 = first.log_prob(codes1.unsqueeze(1), model.logits(0, upper).unsqueeze(0))  # (C1, B)
    log_q2 = second.log_prob(codes2.unsqueeze(1), model.logits(1, codes1).unsqueeze(0))  # (C2, C1)
    log_px = -recon_nll(model.output(codes2).unsqueeze(1), lower)  # (C2, B)
    joint = log_q1.unsqueeze(0) + log_q2.unsqueeze(-1) + log_px.unsqueeze(1)  # (C2, C1, B)
    weight = (log_q1.unsqueeze(0) + log_q2.unsqueeze(-1)).exp()
    return -torch.logsumexp(joint.flatten(0, 1), 0), -(weight * log_px.unsqueeze(1)).sum((0, 1))


def _identity(t):
    return t


@pytest.mark.parametrize("latent", LATENTS)
def test_the_single_sample_figure_is_unbiased_and_the_m_sample_bound_reaches_the_likelihood(latent):
    model, x = small_sbn(latent)
    with torch.no_grad():
        nll, expected = exact(model, x)
        assert expected.item() > nll.item() + 0.5  # the two differ: one sample is a loose bound here
        g = torch.Generator().manual_seed(1)
        one = negative_elbo(model, x.repeat(20000, 1), _identity, batch_size=20000, generator=g)
        bound, literal = multi_sample_bounds(model, x, _identity, num_samples=20000, max_rows=5000,
                                             generator=g)
    # The mean of 20,000 single-sample figures: within 4 standard errors of E_h[-log p(x_lower | h)].
    se = model.nelbo(x.repeat(20000, 1), g).std().item() / math.sqrt(20000)
    assert abs(one.item() - expected.item()) < 4 * se
    # With 72 codes and m = 20,000 the importance-sampled estimate is within a few hundredths of a nat.
    assert bound.item() == pytest.approx(nll.item(), abs=0.05)
    # The printed formula read literally (the log inside the mean) estimates the m = 1 objective instead.
    assert abs(literal.item() - expected.item()) < 4 * se


def flat_grads(model: SBN) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def chained_gradients(model: SBN, name: str, x: torch.Tensor, batches: int = 200, draws: int = 500):
    """Per batch of `draws` draws, the estimator chain's gradient of the training loss: (batches, P);
    for the score-function estimators, the normalization of every layer fixed (its scale returned)."""
    cfg = ESTIMATORS[name].config()
    estimators = model.build_estimator(cfg)
    scale = 1.0
    out = []
    for _ in range(batches):
        for est in estimators:
            if isinstance(est, ScoreFunctionBase):  # a converged moving average, the same every batch
                est.mean.fill_(60.0)
                est.var.fill_(16.0)
                est.started.fill_(True)
                scale = 1 / math.sqrt(16.0)
        model.zero_grad()
        loss, _ = model.training_loss(estimators, x.expand(draws, -1), torch.tensor(1.0))
        loss.backward()
        out.append(flat_grads(model))
    return torch.stack(out), scale


def exact_gradients(model: SBN, x: torch.Tensor, scale: float) -> torch.Tensor:
    """d E_h[-log p(x_lower | h)] / d parameters, by enumeration; the layers' nets scaled as a
    normalized score-function chain delivers them (the output net is never rescaled)."""
    model.zero_grad()
    exact(model, x)[1].sum().backward()
    parts = [p.grad.flatten() * (scale if i < len(model.nets) - 1 else 1.0)
             for i, net in enumerate(model.nets) for p in net.parameters()]
    return torch.cat(parts)


def assert_unbiased(per_batch: torch.Tensor, exact: torch.Tensor, z_max: float = 5.0) -> None:
    mean = per_batch.mean(0)
    se = per_batch.std(0) / math.sqrt(len(per_batch))
    z = (mean - exact).abs() / (se + 1e-9)
    assert (z < z_max).all(), f"max |z| = {z.max():.1f}"


UNBIASED = [(n, lt) for n, lt in COMBINATIONS if n in ("rebar", "relax", "rloo", "disarm", "score_function",
                                                          "muprop")]


@pytest.mark.parametrize(("name", "latent"), UNBIASED)
def test_an_unbiased_estimator_stays_unbiased_through_both_layers(name, latent):
    """Each layer's estimator sees the rest of the network as its loss: the chain rule, estimator by
    estimator, so an unbiased estimator's chain is unbiased for every parameter of every layer
    (the score-function estimators up to their normalization scale, held fixed here)."""
    torch.manual_seed(4)
    model, x = small_sbn(latent)
    per_batch, scale = chained_gradients(model, name, x)
    assert_unbiased(per_batch, exact_gradients(model, x, scale))


def exact_k_sample_gradients(model: SBN, x: torch.Tensor, k: int) -> torch.Tensor:
    """d E[-log (1/K) sum_k p(x_lower | h_k)] / d parameters, h_k iid paths through both layers, by
    enumeration of every K-tuple of paths (one image)."""
    upper, lower = model.halves(x)
    first, second = model.latents
    codes1, codes2 = every_code(first), every_code(second)
    log_q1 = first.log_prob(codes1, model.logits(0, upper))  # (C1,)
    log_q2 = second.log_prob(codes2.unsqueeze(1), model.logits(1, codes1).unsqueeze(0))  # (C2, C1)
    log_path = (log_q1.unsqueeze(0) + log_q2).flatten()  # every path (h1, h2)
    log_px = (-recon_nll(model.output(codes2), lower)).unsqueeze(1).expand_as(log_q2).flatten()
    tuples = torch.tensor(list(itertools.product(range(len(log_path)), repeat=k)))
    bound = math.log(k) - torch.logsumexp(log_px[tuples], -1)
    model.zero_grad()
    (log_path[tuples].sum(-1).exp() * bound).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("latent", LATENTS)
def test_vimco_is_unbiased_for_the_k_sample_objective_through_both_layers(latent):
    """objective=iwae with K = 2: VIMCO's signal for the whole path, every layer's log-probability
    with it, against the K-sample objective's gradient summed over every pair of paths."""
    torch.manual_seed(6)
    model, x = small_sbn(latent)
    model.objective, model.samples = Objective.iwae, 2
    estimators = model.build_estimator(ESTIMATORS["vimco"].config())
    out = []
    for _ in range(200):
        model.zero_grad()
        loss, _ = model.training_loss(estimators, x.expand(500, -1), torch.tensor(1.0))
        loss.backward()
        out.append(flat_grads(model))
    assert_unbiased(torch.stack(out), exact_k_sample_gradients(model, x, 2))


def test_the_chain_check_detects_a_biased_estimator():
    torch.manual_seed(4)
    model, x = small_sbn("bernoulli")
    per_batch, scale = chained_gradients(model, "straight_through", x)
    with pytest.raises(AssertionError):
        assert_unbiased(per_batch, exact_gradients(model, x, scale))


@pytest.mark.parametrize("latent", LATENTS)
def test_the_microscopes_reference_for_the_sbn_is_unbiased(latent):
    """The first layer's local expectation gradient, with the second layer sampled, against the
    gradient of E_h[-log p(x_lower | h)] with respect to the first layer's logits, exact."""
    model, x = small_sbn(latent)
    upper, _ = model.halves(x)
    logits = model.logits(0, upper).detach().requires_grad_()
    # exact() with the first layer's logits as a leaf: enumerate, then differentiate.
    first, second = model.latents
    codes1, codes2 = every_code(first), every_code(second)
    with torch.no_grad():
        log_q2 = second.log_prob(codes2.unsqueeze(1), model.logits(1, codes1).unsqueeze(0))
        log_px = -recon_nll(model.output(codes2).unsqueeze(1), model.halves(x)[1])
        f1 = -(log_q2.exp().unsqueeze(-1) * log_px.unsqueeze(1)).sum(0)  # (C1, B): F(h1)
    q1 = first.log_prob(codes1.unsqueeze(1), logits.unsqueeze(0)).exp()
    (reference,) = torch.autograd.grad((q1 * f1).sum(), logits)
    torch.manual_seed(5)
    mean, se = local_expectation_gradient(model, x, draws=20000)
    assert ((mean - reference).abs() < 5 * se + 1e-6).all()
    kind = reference_gradient(model, x, validate(compose_config([*SYNTHETIC, "task=sbn"])).diag)[2]
    assert kind == "local expectation"  # never "exact": the second layer is sampled


def test_the_sbns_configuration_is_checked():
    for override, key in (("model.net=conv", "model.net"), ("model.prior=learned", "model.prior"),
                          ("task.layers=0", "task.layers"),
                          ("data.image_shape=[1,11,12]", "data.image_shape")):
        extra = ["data.parts=1"] if "image_shape" in override else []
        with pytest.raises(ConfigError, match=key):
            validate(compose_config([*SYNTHETIC, "task=sbn", override, *extra]))


def test_the_table_places_sbn_runs_in_the_papers_sbn_rows():
    bernoulli = validate(compose_config(["task=sbn", "model=bernoulli"]))
    categorical = validate(compose_config(["task=sbn", "model=categorical"]))
    assert (row_label(bernoulli), row_label(categorical)) == ("SBN Bernoulli (200)",
                                                              "SBN categorical (20x10)")
    assert row_label(validate(compose_config(["model=bernoulli"]))) == "Bernoulli (200)"
    assert bernoulli.model.hidden == [] and validate(compose_config([])).model.hidden == [512, 256]


# -----------------------------------------------------------------------------
# every path the VAE has


@pytest.mark.slow
@pytest.mark.parametrize(("name", "latent"), COMBINATIONS)
def test_every_estimator_trains_the_sbn_in_the_trainer(name, latent, tmp_path):
    cfg = compose_config([*SBN_RUN, *LATENTS[latent], *estimator_overrides(name), "train.max_steps=20"])
    metrics = train(cfg, tmp_path)
    assert metrics["status"] == "complete" and metrics["step"] == 20
    assert all(math.isfinite(metrics[k]) for k in ("val_nelbo_best", "test_nelbo", "test_bound"))
    assert metrics["test_bound"] <= metrics["test_nelbo"] + 1.0  # 4 samples: no worse than one, roughly


# Validation figure after 300 steps of the paper's Bernoulli SBN (392-200-200-392, linear; Adam 1e-3,
# batch 100, static binarization), measured on the 2-core CPU machine: 106.54, 106.87 and 107.07 nats
# with seeds 0, 1 and 2 (untrained: 263.8 to 266.8). Predicting every lower half by the mean
# training lower half scores 109.02 on the same validation set. The level is a nat below that, so a
# run that passes predicts from the upper half, with 0.9 nats to spare above the worst seed.
SBN_LEVEL = 108.0


@pytest.mark.slow
def test_the_sbn_learns_to_predict_the_lower_half_of_mnist_digits(mnist_root, tmp_path):
    metrics = train(compose_config(["device=cpu", "task=sbn", "model=bernoulli", "train.max_steps=300",
                                    "train.eval_every=300", "eval.num_samples=8", "eval.batch_size=2000",
                                    "eval.max_rows=20000", "eval.images=false"]), tmp_path)
    assert metrics["val_nelbo"] < SBN_LEVEL, metrics
    assert metrics["test_bound"] < metrics["test_nelbo"] < SBN_LEVEL + 2


RESUMABLE = [*SYNTHETIC, "task=sbn", "estimator=score_function", "data.binarization=dynamic",
             "schedule.every=10", "schedule.rate=0.02", "eval.images=false"]


@pytest.mark.slow
def test_a_killed_sbn_run_resumes_to_the_straight_runs_numbers(tmp_path, monkeypatch):
    straight = train(compose_config(RESUMABLE), tmp_path / "straight")
    with_step_hook(monkeypatch, lambda n, run: n == 13 and signal.raise_signal(signal.SIGTERM))
    with pytest.raises(Interrupted, match="SIGTERM at step 13"):
        train(compose_config(RESUMABLE), tmp_path / "run")
    monkeypatch.undo()
    resumed = train(compose_config([*RESUMABLE, "train.resume=true"]), tmp_path / "run")
    for key in ("step", "val_nelbo_best", "test_nelbo", "test_bound"):
        assert resumed[key] == straight[key], key
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("run", "straight"))
    for key in ("model", "estimator", "optimizer", "sampler"):
        assert_same_state(a[key], b[key], key)


@pytest.mark.slow
def test_an_sbn_sweep_trains_packed_and_is_evaluated_and_drawn_from_its_folders(tmp_path, caplog):
    sweep = tmp_path / "sweep"
    result = gvae_train(["-m", "hydra/launcher=packed", "hydra.launcher.workers=1", *SBN_RUN, "seed=0,1",
                         "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"], tmp_path)  # one pack of 4
    assert result.returncode == 0, result.stdout[-3000:]
    assert "4 runs packed" in result.stdout
    job = sweep / "0"
    metrics = json.loads((job / "metrics.json").read_text())
    assert gvae_eval([str(job), "eval.num_samples=8"]) == 0
    record = json.loads((job / "eval.json").read_text())
    assert record["test_nelbo"] == pytest.approx(metrics["test_nelbo"], rel=1e-6)  # the same figure again
    assert record["test_bound"] < record["test_nelbo"]
    assert gvae_sample([str(job), "--out", str(tmp_path / "pictures"), "--num", "16"]) == 0
    with Image.open(tmp_path / "pictures" / "completions.png") as image:
        assert image.format == "PNG" and image.width > 40


@pytest.mark.slow
def test_the_microscope_diagnoses_an_sbn_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose_config([*SBN_RUN, "train.max_steps=20", "diag.every=10", "diag.draws=4", "diag.batch=4",
                          "diag.reference_draws=4"]), tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("grad/bias")] == [10, 20]
    assert "samples/completion" in events.Tags()["images"]
