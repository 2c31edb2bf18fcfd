"""gvae's estimators in a model of your own (not gvae's VAE): a discrete bottleneck for regression.

    python docs/examples/own_model.py

An encoder maps x (8 numbers) to the logits of 4 categorical variables with 3 classes; a decoder maps
the one-hot code back to a prediction of y, a function of x that passes through such a code (a teacher
network's). The loss is the squared error at a sampled code. The same model is trained three ways:
straight-through Gumbel-Softmax (a sample with the right gradient), REINFORCE leave-one-out (the loss
as a function of the code, k samples) and RELAX (a learned control variate, trained on the estimator's
variance with the model's optimizer). Each prints its loss before and after, at exact samples.
"""

from __future__ import annotations

import torch
from torch import nn

from gvae.api import estimator

NUM_VARS, NUM_CLASSES, DIM = 4, 3, 8


def data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x, and y made from x through a hidden discrete code: what a discrete bottleneck can fit."""
    teacher = torch.randn(DIM, NUM_VARS * NUM_CLASSES, generator=generator)
    readout = torch.randn(NUM_VARS * NUM_CLASSES, DIM, generator=generator)
    x = torch.randn(n, DIM, generator=generator)
    code = nn.functional.one_hot((x @ teacher).view(n, NUM_VARS, NUM_CLASSES).argmax(-1), NUM_CLASSES)
    return x, code.flatten(1).float() @ readout


def train(name: str, steps: int = 400, **options) -> tuple[float, float]:
    """Train a fresh model with estimator `name`; its mean loss at exact samples, before and after."""
    g = torch.Generator().manual_seed(0)
    x, y = data(512, g)
    torch.manual_seed(0)
    encoder, decoder = nn.Linear(DIM, NUM_VARS * NUM_CLASSES), nn.Linear(NUM_VARS * NUM_CLASSES, DIM)
    est = estimator(name, "categorical", num_vars=NUM_VARS, num_classes=NUM_CLASSES, **options)
    params = [*encoder.parameters(), *decoder.parameters(), *est.parameters()]  # RELAX's own ones too
    optimizer = torch.optim.Adam(params, lr=1e-2)

    def loss_at(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # f: a code -> one loss each
        return (decoder(z.flatten(1)) - target).square().sum(-1)

    def exact_loss() -> float:
        with torch.no_grad():
            logits = encoder(x).view(-1, NUM_VARS, NUM_CLASSES)
            z = est.latent.sample(logits)  # exact one-hot samples
            return loss_at(z, y).mean().item()

    before = exact_loss()
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=g)
        logits = encoder(x[batch]).view(-1, NUM_VARS, NUM_CLASSES)
        if name == "st_gumbel_softmax":  # reparameterised: differentiate through the sample
            loss = loss_at(est.sample(logits, tau=0.5), y[batch]).mean()
        else:  # any estimator: the loss as a function of the code
            surrogate, _ = est(logits, tau=1.0, f=lambda z, t=y[batch]: loss_at(z, t))
            loss = surrogate.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, exact_loss()


def main() -> dict[str, tuple[float, float]]:
    results = {}
    for name, options in (("st_gumbel_softmax", {}), ("rloo", {"k": 4}), ("relax", {"hidden": [32]})):
        before, after = train(name, **options)
        results[name] = before, after
        print(f"{name:18s} loss at exact samples: {before:8.3f} -> {after:8.3f}")
    return results


if __name__ == "__main__":
    main()
