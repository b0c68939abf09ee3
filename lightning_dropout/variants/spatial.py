"""Spatial (channel) dropout for 1d, 2d and 3d feature maps.

Tompson, Goroshin, Jain, LeCun, Bregler. "Efficient Object Localization Using Convolutional Networks."
CVPR 2015.

One Bernoulli(``1-p``) value per sample and channel, shared over every spatial position: input
``(N, C, *spatial)`` gets a mask of shape ``(N, C, 1, ..., 1)``. Kept channels are scaled by ``1/(1-p)`` in
training; eval is the identity. Unlike ``nn.Dropout2d`` the number of spatial dimensions is read from the
input (1, 2 or 3), so one module serves Conv1d, Conv2d and Conv3d outputs; a 2-D input ``(N, C)`` has no
spatial extent and is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dropout.errors import check_rate
from lightning_dropout.variants._base import DropoutVariant, keep_mask, register_variant

__all__ = ["SpatialDropout", "spatial_dropout"]


def spatial_dropout(
    x: Tensor, p: float = 0.5, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Functional twin of :class:`SpatialDropout`; ``x`` is ``(N, C, *spatial)`` with 1 to 3 spatial dims."""
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    return _apply(x, p, generator)[0]


def _apply(x: Tensor, p: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The training pass: ``(output, keep-mask)``, one mask value per sample and channel."""
    mask = keep_mask((x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2), 1.0 - p, x, generator)
    return x * mask / (1.0 - p), mask


@register_variant("spatial")
class SpatialDropout(DropoutVariant):
    """Drop whole channels of a feature map (see the module docstring).

    Args:
        p: probability of dropping a channel of one sample.

    Shape:
        input ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``; output the same.

    Example:
        >>> y = SpatialDropout(0.5)(torch.ones(2, 8, 5))
        >>> bool(((y == 0).all(-1) | (y != 0).all(-1)).all())  # a channel is dropped whole or kept whole
        True
    """

    def check_input(self, shape: torch.Size) -> str | None:
        if not 3 <= len(shape) <= 5:
            return "needs a feature map (N, C, L), (N, C, H, W) or (N, C, D, H, W)"
        return None

    def forward(self, x: Tensor) -> Tensor:
        if not self._active(x):
            return x
        out, mask = _apply(x, self.p, self.generator)
        self._record(mask)
        return out
