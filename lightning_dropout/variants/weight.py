"""Weight dropout (DropConnect): drop entries of a weight matrix instead of activations.

Wan, Zeiler, Zhang, LeCun, Fergus. "Regularization of Neural Networks using DropConnect." ICML 2013.
As used on LSTM hidden-to-hidden weights by Merity, Keskar, Socher, "Regularizing and Optimizing LSTM
Language Models" (AWD-LSTM), ICLR 2018.

Each forward draws one Bernoulli(``1-p``) mask of the weight's shape, shared by every sample and every
time step; kept entries are scaled by ``1/(1-p)`` (inverted, as AWD-LSTM). Eval uses the weight unchanged
(the moment-matched Gaussian inference of Wan et al. is not implemented). Gradients flow to the original
parameter, which keeps its name: the injection engine feeds the dropped tensor to the layer for one call
(for torch RNNs through their flat weight list, which works with the fused cuDNN kernel) instead of
re-registering the parameter (the breakages of awd-lstm-lm #51 and #72).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dropout.errors import DropoutConfigError, check_rate
from lightning_dropout.variants._base import DropoutVariant, keep_mask, register_variant

__all__ = ["WeightDropout", "weight_dropout"]


def weight_dropout(
    weight: Tensor, p: float = 0.5, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Functional twin of :class:`WeightDropout`: inverted dropout on a weight tensor."""
    p = check_rate(p)
    if not training or p == 0.0:
        return weight
    return _apply(weight, p, generator)[0]


def _apply(
    weight: Tensor, p: float, generator: torch.Generator | None, need_mask: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The training pass: ``(dropped weight, keep-mask)``. Without a generator it runs torch's fused
    ``F.dropout`` unless ``need_mask``; its mask is not exposed (``None``)."""
    if generator is None and not need_mask:
        return F.dropout(weight, p, True), None
    mask = keep_mask(weight.shape, 1.0 - p, weight, generator)
    return weight * mask / (1.0 - p), mask


@register_variant("weight")
class WeightDropout(DropoutVariant):
    """DropConnect on the weights of the module it is attached to (see the module docstring).

    Args:
        p: probability of dropping a weight entry (per forward call).
        weights: names of the parameters to drop. ``None`` picks a default for the module it is attached
            to: every ``weight_hh_l*`` of a recurrent module (the AWD-LSTM choice), else ``weight``.

    Shape:
        called on a weight tensor of any shape; returns the same shape.

    Example:
        >>> w = torch.ones(4, 4)
        >>> WeightDropout(0.5).eval()(w).equal(w)
        True
    """

    def __init__(self, p: float = 0.5, weights: list[str] | None = None) -> None:
        super().__init__(p)
        self.weights = self.checked_param("weights", weights)

    @classmethod
    def checked_param(cls, name: str, value: Any) -> Any:
        if value is None:
            return None
        if (
            isinstance(value, str)
            or not isinstance(value, (list, tuple))
            or not all(isinstance(w, str) for w in value)
        ):
            raise DropoutConfigError(
                f"`weights` must be a list of parameter names (str) or None, but got weights={value!r}."
            )
        return list(value)

    @classmethod
    def params_from_target(cls, module: nn.Module, where: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """On a module's weights (``where="weight"``), ``weights`` defaults to its recurrent weights
        (``weight_hh_l*``) or its ``weight``; every name must be a parameter of the module."""
        out = dict(params)
        if where != "weight":
            return out
        names = out.get("weights")
        if names is None:
            if isinstance(module, nn.RNNBase):
                names = [n for n in module._flat_weights_names if n.startswith("weight_hh")]
            else:
                names = ["weight"]
        present = [n for n, _ in module.named_parameters(recurse=False)]
        missing = [n for n in names if n not in present]
        if missing:
            raise DropoutConfigError(
                f"variant 'weight' needs parameters {missing} on {type(module).__name__}, which has {present}."
            )
        out["weights"] = list(names)
        return out

    def forward(self, weight: Tensor) -> Tensor:
        if not self._active(weight):
            return weight
        out, mask = _apply(weight, self.p, self.generator, need_mask=self.track)
        self._record(mask)
        return out
