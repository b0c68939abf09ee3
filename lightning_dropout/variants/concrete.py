"""Concrete dropout: a dropout rate learned by gradient descent.

Gal, Hron, Kendall. "Concrete Dropout." NeurIPS 2017.

The rate is ``p = sigmoid(p_logit)`` with ``p_logit`` a parameter. In training the Bernoulli mask is
replaced by its Concrete (relaxed Bernoulli) sample

    z = sigmoid((log p - log(1-p) + log u - log(1-u)) / t),   u ~ U(0, 1) element-wise,

and the output is ``x * (1 - z) / (1 - p)``; eval is the identity. The rate is driven by a regularizer that
must be added to the training loss (``DropoutInjector`` does this for you):

    weight_regularizer * sum ||W||^2 / (1 - p)  +  dropout_regularizer * K * (p log p + (1-p) log(1-p))

with ``W`` the parameters of the layer the site belongs to and ``K`` the number of features per sample of
the dropped tensor (as in the authors' code, which divides by ``1 - p`` where the paper's Eq. 3 multiplies;
see yaringal/ConcreteDropout #1). ``p_logit`` appears in ``state_dict`` as an extra key and is saved in
checkpoints; read the current rate with ``module.p``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dropout.errors import DropoutConfigError, check_number, check_rate
from lightning_dropout.variants._base import DropoutVariant, register_variant, rng

__all__ = ["ConcreteDropout", "concrete_dropout", "concrete_regularizer"]

_EPS = 1e-7


def concrete_dropout(
    x: Tensor,
    p_logit: Tensor,
    temperature: float = 0.1,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Functional twin of :class:`ConcreteDropout`; differentiable in ``x`` and ``p_logit``."""
    if not training:
        return x
    p = torch.sigmoid(p_logit)
    u = torch.rand(x.shape, dtype=x.dtype, device=x.device, **rng(generator))
    z = torch.sigmoid(
        (torch.log(p + _EPS) - torch.log1p(_EPS - p) + torch.log(u + _EPS) - torch.log1p(_EPS - u))
        / temperature
    )
    return x * (1.0 - z) / (1.0 - p)


def concrete_regularizer(
    p_logit: Tensor,
    weights: Iterable[Tensor],
    input_features: int,
    weight_regularizer: float = 1e-6,
    dropout_regularizer: float = 1e-5,
) -> Tensor:
    """The Concrete-dropout regularizer for one site (see the module docstring)."""
    p = torch.sigmoid(p_logit)
    square = sum((w.pow(2).sum() for w in weights), torch.zeros((), device=p_logit.device))
    entropy = p * torch.log(p + _EPS) + (1.0 - p) * torch.log1p(_EPS - p)
    return weight_regularizer * square / (1.0 - p) + dropout_regularizer * input_features * entropy


@register_variant("concrete")
class ConcreteDropout(DropoutVariant):
    """Dropout whose rate is a learned parameter (see the module docstring).

    Args:
        p: the initial rate (``p_logit = logit(p)``); ``0 < p < 1``.
        temperature: the Concrete relaxation temperature ``t``.
        weight_regularizer: ``wr``, the weight of the ``||W||^2 / (1 - p)`` term.
        dropout_regularizer: ``dr``, the weight of the entropy term (the paper sets ``2 / (N tau)``).

    Example:
        >>> drop = ConcreteDropout(0.2)
        >>> round(drop.p, 3), sorted(drop.state_dict())
        (0.2, ['p_logit'])
    """

    schedulable = False
    p_logit: nn.Parameter  # registered by the ``p`` setter

    def __init__(
        self,
        p: float = 0.1,
        temperature: float = 0.1,
        weight_regularizer: float = 1e-6,
        dropout_regularizer: float = 1e-5,
    ) -> None:
        super().__init__(p)
        self.temperature = self.checked_param("temperature", temperature)
        self.weight_regularizer = self.checked_param("weight_regularizer", weight_regularizer)
        self.dropout_regularizer = self.checked_param("dropout_regularizer", dropout_regularizer)
        self.input_features = 0  # K, set by the last training forward

    @classmethod
    def checked_rate(cls, p: object) -> float:
        rate = check_rate(p)
        if rate == 0.0:
            raise DropoutConfigError(
                f"`p` must satisfy 0 < p < 1 for variant 'concrete' (its logit), but got {p=}."
            )
        return rate

    @classmethod
    def checked_param(cls, name: str, value: Any) -> Any:
        if name == "temperature":
            return float(check_number(value, name))
        return float(check_number(value, name, inclusive=True))  # a regularizer of 0 switches its term off

    @property
    def p(self) -> float:
        """The current learned rate ``sigmoid(p_logit)``."""
        return float(torch.sigmoid(self.p_logit.detach()))

    @p.setter
    def p(self, value: float) -> None:
        logit = math.log(value) - math.log1p(-value)
        if "p_logit" in self._parameters:
            with torch.no_grad():
                self.p_logit.fill_(logit)
        else:
            self.p_logit = nn.Parameter(torch.tensor(logit))

    def regularizer(self, weights: Iterable[Tensor]) -> Tensor:
        """The loss term for this site, given the parameters ``W`` of the layer it belongs to."""
        return concrete_regularizer(
            self.p_logit, weights, self.input_features, self.weight_regularizer, self.dropout_regularizer
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        self.input_features = x[0].numel() if x.dim() > 1 else 1
        out = concrete_dropout(x, self.p_logit, self.temperature, True, self.generator)
        if self.track:
            self.drop_fraction = torch.sigmoid(self.p_logit.detach())
        return out
