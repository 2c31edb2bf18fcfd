"""gvae: discrete-latent VAEs on MNIST (Jang, Gu & Poole 2017) and the gradient estimators they compare."""

__version__ = "0.1.0"
