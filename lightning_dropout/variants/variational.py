"""Variational ("locked") dropout: one mask per sequence, shared across time steps.

Gal & Ghahramani. "A Theoretically Grounded Application of Dropout in Recurrent Neural Networks."
NeurIPS 2016. (AWD-LSTM's ``LockedDropout``, Merity et al. 2018, is the same operation.)

For a sequence ``(B, T, *)`` (``batch_first=True``) or ``(T, B, *)`` (``batch_first=False``, the torch RNN
default) the mask has shape ``(B, 1, *)`` or ``(1, B, *)``: each sample keeps the same units at every
step. A 2-D input is refused: after a ``Linear`` it would be a batch of vectors, not a sequence. A :class:`~torch.nn.utils.rnn.PackedSequence` gets one
mask row per sequence, repeated over its steps. Kept units are scaled by ``1/(1-p)``; eval is the identity.

Unlike AWD-LSTM's ``LockedDropout`` (which assumes time-major input, so with ``batch_first=True`` it shares
the mask across the batch and varies it over time), the time axis here follows ``batch_first``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_dropout.errors import DropoutConfigError, check_rate
from lightning_dropout.variants._base import DropoutVariant, keep_mask, register_variant

__all__ = ["VariationalDropout", "variational_dropout"]


def _packed_row_index(batch_sizes: Tensor) -> Tensor:
    # In PackedSequence.data, step t holds rows for sequences 0 .. batch_sizes[t]-1 (sorted order).
    sizes = batch_sizes.tolist()
    return torch.cat([torch.arange(n) for n in sizes])


def variational_dropout(
    x: Tensor | PackedSequence,
    p: float = 0.5,
    training: bool = True,
    batch_first: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor | PackedSequence:
    """Functional twin of :class:`VariationalDropout`.

    Args:
        x: ``(B, T, *)`` if ``batch_first`` else ``(T, B, *)``, or a PackedSequence.
        p: probability of dropping a unit for a whole sequence.
        training: identity when ``False``.
        batch_first: layout of ``x`` (ignored for PackedSequence and unbatched input).
        generator: draw the mask from this generator.
    """
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    out, _ = _apply(x, p, batch_first, generator)
    return out


def _apply(
    x: Tensor | PackedSequence, p: float, batch_first: bool, generator: torch.Generator | None
) -> tuple[Tensor | PackedSequence, Tensor]:
    """The training pass: ``(output, keep-mask)``, one mask row per sequence."""
    if isinstance(x, PackedSequence):
        n_seq = int(x.batch_sizes[0])
        mask = keep_mask((n_seq, *x.data.shape[1:]), 1.0 - p, x.data, generator)
        rows = _packed_row_index(x.batch_sizes).to(x.data.device)
        data = x.data * mask[rows] / (1.0 - p)
        return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices), mask
    if x.dim() < 3:
        raise DropoutConfigError(
            f"variational dropout needs a sequence (B, T, *) or (T, B, *), but got shape {tuple(x.shape)}."
        )
    shape = (x.shape[0], 1, *x.shape[2:]) if batch_first else (1, x.shape[1], *x.shape[2:])
    mask = keep_mask(shape, 1.0 - p, x, generator)
    return x * mask / (1.0 - p), mask


@register_variant("variational")
class VariationalDropout(DropoutVariant):
    """One dropout mask per sequence, the same at every time step (see the module docstring).

    Args:
        p: probability of dropping a unit for a whole sequence.
        batch_first: ``True`` for ``(B, T, *)`` input, ``False`` for ``(T, B, *)``. The injection engine
            copies it from the recurrent module it follows.

    Example:
        >>> y = VariationalDropout(0.5, batch_first=True)(torch.ones(2, 7, 3))
        >>> bool((y == y[:, :1]).all())  # same mask at every step
        True
    """

    def __init__(self, p: float = 0.5, batch_first: bool = False) -> None:
        super().__init__(p)
        self.batch_first = self.checked_param("batch_first", batch_first)

    @classmethod
    def checked_param(cls, name: str, value: Any) -> Any:
        return bool(value)

    @classmethod
    def params_from_target(cls, module: nn.Module, where: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """``batch_first`` copied from the recurrent module the site follows, unless given."""
        out = dict(params)
        if "batch_first" not in out and isinstance(module, nn.RNNBase):
            out["batch_first"] = bool(module.batch_first)
        return out

    def check_input(self, shape: torch.Size) -> str | None:
        return "needs a sequence (B, T, *) or (T, B, *)" if len(shape) < 3 else None

    def forward(self, x: Tensor | PackedSequence) -> Tensor | PackedSequence:
        if not self._active(x):
            return x
        out, mask = _apply(x, self.p, self.batch_first, self.generator)
        self._record(mask)
        return out
