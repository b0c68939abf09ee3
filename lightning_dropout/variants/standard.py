"""Standard (Bernoulli) dropout, inverted or with the classic scale-at-inference rule.

Srivastava, Hinton, Krizhevsky, Sutskever, Salakhutdinov. "Dropout: A Simple Way to Prevent Neural Networks
from Overfitting." JMLR 15, 2014.

Every element is kept with probability ``1 - p`` (mask shape = input shape).

* ``scaling="inverted"`` (default, what ``nn.Dropout`` does): training output ``x * m / (1 - p)``, eval
  output ``x``.
* ``scaling="inference"`` (the paper's original form): training output ``x * m`` with no rescaling, eval
  output ``x * (1 - p)``. Both forms have the same expectation: ``E[train] = eval``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dropout.errors import DropoutConfigError, check_rate
from lightning_dropout.variants._base import DropoutVariant, keep_mask, register_variant

__all__ = ["SCALINGS", "AttentionDropout", "Dropout", "attention_dropout", "dropout"]

SCALINGS = ("inverted", "inference")


def _check_scaling(scaling: str) -> str:
    if scaling not in SCALINGS:
        raise DropoutConfigError(f"`scaling` must be one of {list(SCALINGS)}, but got {scaling=!r}.")
    return scaling


def dropout(
    x: Tensor,
    p: float = 0.5,
    training: bool = True,
    scaling: str = "inverted",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Functional twin of :class:`Dropout`.

    Args:
        x: input of any shape ``(*)``.
        p: probability of dropping each element.
        training: apply the mask when ``True``; otherwise the inference rule of ``scaling``.
        scaling: ``"inverted"`` or ``"inference"`` (see the module docstring).
        generator: draw the mask from this generator instead of the global one.

    Returns:
        A tensor of the shape of ``x``.

    Example:
        >>> x = torch.ones(4)
        >>> dropout(x, p=0.5, training=False, scaling="inference")
        tensor([0.5000, 0.5000, 0.5000, 0.5000])
    """
    _check_scaling(scaling)
    p = check_rate(p)
    if not training or p == 0.0:
        return _idle(x, p, training, scaling)
    return _apply(x, p, scaling, generator)[0]


def _idle(x: Tensor, p: float, training: bool, scaling: str) -> Tensor:
    """The output where nothing is dropped (eval, or ``p == 0``): the inference rule of ``scaling``."""
    return x * (1.0 - p) if scaling == "inference" and not training else x


def _apply(
    x: Tensor, p: float, scaling: str, generator: torch.Generator | None, need_mask: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The training pass of ``dropout`` and ``attention``: ``(output, keep-mask)``. Inverted dropout without a
    generator runs torch's fused ``F.dropout`` unless ``need_mask``; its mask is not exposed (``None``)."""
    if scaling == "inverted" and generator is None and not need_mask:
        return F.dropout(x, p, True), None
    mask = keep_mask(x.shape, 1.0 - p, x, generator)
    return (x * mask / (1.0 - p) if scaling == "inverted" else x * mask), mask


@register_variant("standard")
class Dropout(DropoutVariant):
    """Element-wise Bernoulli dropout (see the module docstring for the two scaling rules).

    Args:
        p: probability of dropping an element, ``0 <= p < 1``.
        scaling: ``"inverted"`` (scale kept units by ``1/(1-p)`` in training) or ``"inference"`` (scale by
            ``1-p`` in eval).

    Shape:
        input ``(*)``, output the same.

    Example:
        >>> drop = Dropout(0.2)
        >>> drop(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, p: float = 0.5, scaling: str = "inverted") -> None:
        super().__init__(p)
        self.scaling = self.checked_param("scaling", scaling)

    @classmethod
    def checked_param(cls, name: str, value: Any) -> Any:
        return _check_scaling(value) if name == "scaling" else value

    def forward(self, x: Tensor) -> Tensor:
        if not self._active(x):
            return _idle(x, self.p, self.training, self.scaling)
        out, mask = _apply(x, self.p, self.scaling, self.generator, need_mask=self.track)
        self._record(mask)
        return out


def attention_dropout(
    weights: Tensor, p: float = 0.1, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Functional twin of :class:`AttentionDropout`: inverted dropout on attention probabilities."""
    return dropout(weights, p, training, "inverted", generator)


@register_variant("attention")
class AttentionDropout(DropoutVariant):
    """Inverted dropout on attention probabilities ``(B, heads, T_query, T_key)``.

    Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (attention dropout, section 5.4).

    Each attention weight is zeroed with probability ``p`` and the rest scaled by ``1/(1-p)``, so a row no
    longer sums to one in training (pytorch#42929); eval is the identity. For ``nn.MultiheadAttention`` and
    ``nn.Transformer*Layer`` the injection engine sets their float ``dropout`` attribute instead of adding
    a module (the fused kernel applies it); use this module inside hand-written attention code.

    Example:
        >>> AttentionDropout(0.1)(torch.softmax(torch.randn(2, 4, 5, 5), -1)).shape
        torch.Size([2, 4, 5, 5])
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self._active(x):
            return x
        out, mask = _apply(x, self.p, "inverted", self.generator, need_mask=self.track)
        self._record(mask)
        return out
