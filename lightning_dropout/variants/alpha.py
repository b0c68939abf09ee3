"""Alpha dropout and feature alpha dropout, for self-normalizing (SELU) networks.

Klambauer, Unterthiner, Mayr, Hochreiter. "Self-Normalizing Neural Networks." NeurIPS 2017.

A dropped unit is set to ``a' = -lambda * alpha = -1.7581`` (SELU's negative saturation) instead of 0, then
the output is ``a * x + b`` with ``a = ((1-p)(1 + p a'^2))^-1/2`` and ``b = -a a' p``, so that an input with
zero mean and unit variance keeps them. ``alpha`` drops elements; ``feature_alpha`` drops whole channels
(one value per sample and channel, shared over the remaining dims). Eval is the identity. Note that
``torch.nn.functional.alpha_dropout`` defaults to ``training=False``; the modules here follow ``.training``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dropout.errors import check_rate
from lightning_dropout.variants._base import DropoutVariant, keep_mask, register_variant

__all__ = [
    "SELU_ALPHA_PRIME",
    "AlphaDropout",
    "FeatureAlphaDropout",
    "alpha_dropout",
    "feature_alpha_dropout",
]

SELU_ALPHA_PRIME = -1.0507009873554805 * 1.6732632423543772


def _affine(p: float) -> tuple[float, float]:
    a = 1.0 / math.sqrt((1.0 - p) * (1.0 + p * SELU_ALPHA_PRIME**2))
    return a, -a * SELU_ALPHA_PRIME * p


def _apply(
    x: Tensor, p: float, per_channel: bool, generator: torch.Generator | None, need_mask: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The training pass of ``alpha`` (``per_channel=False``) and ``feature_alpha``: ``(output, keep-mask)``.
    Element-wise without a generator it runs torch's fused ``F.alpha_dropout`` unless ``need_mask``; its mask
    is not exposed (``None``)."""
    if not per_channel and generator is None and not need_mask:
        return F.alpha_dropout(x, p, True), None
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2) if per_channel else x.shape
    mask = keep_mask(shape, 1.0 - p, x, generator)
    a, b = _affine(p)
    return a * (x * mask + SELU_ALPHA_PRIME * (1.0 - mask)) + b, mask


def alpha_dropout(
    x: Tensor, p: float = 0.5, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Functional twin of :class:`AlphaDropout` (note: ``training`` defaults to ``True`` here)."""
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    return _apply(x, p, False, generator)[0]


def feature_alpha_dropout(
    x: Tensor, p: float = 0.5, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Functional twin of :class:`FeatureAlphaDropout`; ``x`` is ``(N, C, *)``."""
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    return _apply(x, p, True, generator)[0]


@register_variant("alpha")
class AlphaDropout(DropoutVariant):
    """Element-wise alpha dropout for SELU networks (see the module docstring).

    Example:
        >>> torch.manual_seed(0) and None
        >>> y = AlphaDropout(0.2)(torch.randn(100_000))
        >>> abs(float(y.mean())) < 0.02 and abs(float(y.std()) - 1) < 0.02
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self._active(x):
            return x
        out, mask = _apply(x, self.p, False, self.generator, need_mask=self.track)
        self._record(mask)
        return out


@register_variant("feature_alpha")
class FeatureAlphaDropout(DropoutVariant):
    """Channel-wise alpha dropout: input ``(N, C, *)``, one mask value per sample and channel."""

    def check_input(self, shape: torch.Size) -> str | None:
        return "needs at least (N, C) input" if len(shape) < 2 else None

    def forward(self, x: Tensor) -> Tensor:
        if not self._active(x):
            return x
        out, mask = _apply(x, self.p, True, self.generator)
        self._record(mask)
        return out
