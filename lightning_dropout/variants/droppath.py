"""DropPath (stochastic depth): drop a whole residual branch for some samples.

Huang, Sun, Liu, Sedra, Weinberger. "Deep Networks with Stochastic Depth." ECCV 2016; as ``DropPath`` in timm
and ``StochasticDepth(mode="row")`` in torchvision.

One Bernoulli(``1-p``) value per sample: input ``(N, *)`` gets a mask ``(N, 1, ..., 1)``. Place it on the
output of a residual branch (``x + drop_path(branch(x))``); never on the trunk. Kept samples are scaled by
``1/(1-p)`` when ``scale_by_keep`` (timm's default, kept for EfficientNet parity; NFNets do not scale, see
timm #887). Eval is the identity. Rates that grow with depth (``linspace(0, p, depth)`` as in timm) are a
rule option of the injection engine (``depth_scaling="linear"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_dropout.errors import check_rate
from lightning_dropout.variants._base import DropoutVariant, keep_mask, register_variant

__all__ = ["DropPath", "drop_path"]


def drop_path(
    x: Tensor,
    p: float = 0.1,
    training: bool = True,
    scale_by_keep: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Functional twin of :class:`DropPath`; ``x`` is ``(N, *)``."""
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    return _apply(x, p, scale_by_keep, generator)[0]


def _apply(
    x: Tensor, p: float, scale_by_keep: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The training pass: ``(output, keep-mask)``, one mask value per sample."""
    mask = keep_mask((x.shape[0],) + (1,) * (x.dim() - 1), 1.0 - p, x, generator)
    return (x * mask / (1.0 - p) if scale_by_keep else x * mask), mask


@register_variant("droppath")
class DropPath(DropoutVariant):
    """Per-sample branch dropping (see the module docstring).

    Args:
        p: probability of dropping the branch for one sample.
        scale_by_keep: scale kept samples by ``1/(1-p)``. With ``False``, eval is still the identity, so the
            expectation is not preserved (NFNet style).

    Example:
        >>> y = DropPath(0.5)(torch.ones(8, 3, 4))
        >>> bool(((y == 0).flatten(1).all(1) | (y == 2).flatten(1).all(1)).all())
        True
    """

    def __init__(self, p: float = 0.1, scale_by_keep: bool = True) -> None:
        super().__init__(p)
        self.scale_by_keep = self.checked_param("scale_by_keep", scale_by_keep)

    @classmethod
    def checked_param(cls, name: str, value: Any) -> Any:
        return bool(value)

    def check_input(self, shape: torch.Size) -> str | None:
        return "needs a batched input (N, *)" if len(shape) < 1 else None

    def forward(self, x: Tensor) -> Tensor:
        if not self._active(x):
            return x
        out, mask = _apply(x, self.p, self.scale_by_keep, self.generator)
        self._record(mask)
        return out
