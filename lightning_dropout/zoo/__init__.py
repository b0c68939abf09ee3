"""Example MNIST-1D models (Greydanus 2020) without dropout of their own, for lightning-dropout to fill."""

from lightning_dropout.zoo.models import CNN, GRU, MLP, MNIST1DClassifier, TransformerEncoderClassifier

__all__ = ["CNN", "GRU", "MLP", "MNIST1DClassifier", "TransformerEncoderClassifier"]
