"""DropBlock: drop contiguous blocks of 1d and 2d feature maps, with the dropped fraction equal to ``p``.

Ghiasi, Lin, Le. "DropBlock: A regularization method for convolutional networks." NeurIPS 2018.

Block seeds are drawn with probability ``gamma`` at every position where a whole ``block_size`` block fits
(the valid region), and each seed zeroes the block it starts; kept units are scaled by ``1/(1-p)``; eval is
the identity. The paper's closed-form ``gamma`` (and timm's and torchvision's versions of it) ignores that
blocks overlap and that border units are covered by fewer blocks, so the fraction actually dropped is not
``p`` (timm drops 0.22 to 0.31 for ``p=0.2`` on 16x16 maps). Here ``gamma`` is solved numerically so that
the expected dropped fraction over the map equals ``p`` exactly:

    1 - mean_over_positions (1 - gamma) ** n(position) = p

where ``n`` is the number of valid seeds whose block covers the position. Mask shape: ``(N, C, *spatial)``,
or ``(N, 1, *spatial)`` with ``share_channels=True``. A ``block_size`` larger than the map is clipped to it.
Even block sizes are supported.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dropout.errors import check_int, check_rate
from lightning_dropout.variants._base import DropoutVariant, keep_mask, register_variant

__all__ = ["DropBlock", "drop_block", "seed_rate"]


def _coverage(size: int, k: int) -> np.ndarray:
    """For each position along one axis, the number of valid block starts whose block covers it."""
    i = np.arange(size)
    return np.minimum(i, size - k) - np.maximum(0, i - k + 1) + 1


def seed_rate(p: float, spatial: Sequence[int], block_size: int) -> float:
    """The seed probability ``gamma`` whose expected dropped fraction on a map of size ``spatial`` is ``p``."""
    return _seed_rate(float(p), tuple(int(s) for s in spatial), int(block_size))


@functools.lru_cache(maxsize=1024)
def _seed_rate(p: float, spatial: tuple[int, ...], block_size: int) -> float:
    if p == 0.0:
        return 0.0
    counts = np.ones(1)
    for size in spatial:
        counts = np.multiply.outer(counts, _coverage(size, min(block_size, size))).ravel()
    values, weights = np.unique(counts, return_counts=True)
    weights = weights / weights.sum()
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection: the dropped fraction is increasing in gamma
        mid = 0.5 * (lo + hi)
        dropped = 1.0 - float(np.sum(weights * (1.0 - mid) ** values))
        lo, hi = (mid, hi) if dropped < p else (lo, mid)
    return 0.5 * (lo + hi)


def _apply(
    x: Tensor, p: float, block_size: int, share_channels: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The training pass: ``(output, keep-mask)``, the mask of shape ``(N, C or 1, *spatial)``."""
    spatial = tuple(x.shape[2:])
    ks = [min(block_size, s) for s in spatial]
    gamma = seed_rate(p, spatial, block_size)
    channels = 1 if share_channels else x.shape[1]
    valid = [s - k + 1 for s, k in zip(spatial, ks, strict=True)]
    seeds = 1.0 - keep_mask((x.shape[0], channels, *valid), 1.0 - gamma, x, generator)
    if len(spatial) == 1:
        seeds = F.pad(seeds, (ks[0] - 1, ks[0] - 1))
        blocks = F.max_pool1d(seeds, kernel_size=ks[0], stride=1)
    else:
        seeds = F.pad(seeds, (ks[1] - 1, ks[1] - 1, ks[0] - 1, ks[0] - 1))
        blocks = F.max_pool2d(seeds, kernel_size=tuple(ks), stride=1)
    keep = 1.0 - blocks
    return x * keep / (1.0 - p), keep


def _check_block_size(block_size: int) -> int:
    return int(check_int(block_size, "block_size"))


def drop_block(
    x: Tensor,
    p: float = 0.1,
    block_size: int = 3,
    training: bool = True,
    share_channels: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Functional twin of :class:`DropBlock`; ``x`` is ``(N, C, L)`` or ``(N, C, H, W)``."""
    _check_block_size(block_size)
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    return _apply(x, p, block_size, share_channels, generator)[0]


@register_variant("dropblock")
class DropBlock(DropoutVariant):
    """Drop ``block_size``-wide contiguous blocks of 1d or 2d feature maps (see the module docstring).

    Args:
        p: expected fraction of units dropped (matched exactly, unlike the paper's formula).
        block_size: side of a block; clipped to the map size.
        share_channels: one spatial mask for all channels of a sample (timm's ``couple_channels``).

    Shape:
        input ``(N, C, L)`` or ``(N, C, H, W)``; output the same.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = DropBlock(0.2, block_size=5)(torch.ones(64, 8, 16, 16))
        >>> round(float((y == 0).float().mean()), 2)
        0.2
    """

    def __init__(self, p: float = 0.1, block_size: int = 3, share_channels: bool = False) -> None:
        super().__init__(p)
        self.block_size = self.checked_param("block_size", block_size)
        self.share_channels = self.checked_param("share_channels", share_channels)

    @classmethod
    def checked_param(cls, name: str, value: Any) -> Any:
        return _check_block_size(value) if name == "block_size" else bool(value)

    def check_input(self, shape: torch.Size) -> str | None:
        return "needs a 1d or 2d feature map (N, C, L) or (N, C, H, W)" if len(shape) not in (3, 4) else None

    def forward(self, x: Tensor) -> Tensor:
        if not self._active(x):
            return x
        out, keep = _apply(x, self.p, self.block_size, self.share_channels, self.generator)
        self._record(keep)
        return out
