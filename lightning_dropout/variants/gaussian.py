"""Gaussian (multiplicative noise) dropout.

Srivastava et al., JMLR 2014, section 10 ("Multiplicative Gaussian Noise"); Keras ``GaussianDropout``.

Each element is multiplied by ``1 + sigma * eps`` with ``eps ~ N(0, 1)`` and ``sigma = sqrt(p / (1 - p))``,
the variance of inverted Bernoulli dropout with rate ``p``. The mean is already 1, so there is no rescaling;
eval is the identity. No unit is removed, so there is no drop fraction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_dropout.errors import check_rate
from lightning_dropout.variants._base import DropoutVariant, register_variant, rng

__all__ = ["GaussianDropout", "gaussian_dropout"]


def gaussian_dropout(
    x: Tensor, p: float = 0.5, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Functional twin of :class:`GaussianDropout`."""
    return _apply(x, check_rate(p), training, generator)


def _apply(x: Tensor, p: float, training: bool, generator: torch.Generator | None) -> Tensor:
    if not training or p == 0.0:
        return x
    noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, **rng(generator))
    return x * (1.0 + math.sqrt(p / (1.0 - p)) * noise)


@register_variant("gaussian")
class GaussianDropout(DropoutVariant):
    """Multiplicative N(1, p/(1-p)) noise (see the module docstring).

    Example:
        >>> GaussianDropout(0.2).eval()(torch.ones(3))
        tensor([1., 1., 1.])
    """

    drops_units = False

    def forward(self, x: Tensor) -> Tensor:
        return _apply(x, self.p, self.training, self.generator)
