"""Data modules for the examples and benchmarks of lightning-dropout."""

from lightning_dropout.data.mnist1d import CACHE_ENV_VAR, MNIST1DDataModule, default_cache_dir
from lightning_dropout.data.resumable import ResumableLoader

__all__ = ["CACHE_ENV_VAR", "MNIST1DDataModule", "ResumableLoader", "default_cache_dir"]
