"""Monte-Carlo dropout prediction (torch only).

Gal & Ghahramani. "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep Learning."
ICML 2016.

``model.train()`` would also put BatchNorm in training mode (it would then normalize with batch statistics
and update its running averages: mmsegmentation #2441, Lightning #20177). :func:`mc_dropout` instead puts the
model in eval mode and switches on only dropout: our variants, torch's ``nn.Dropout*`` family, timm/torchvision
drop-path modules, the float dropout of ``nn.MultiheadAttention`` and stacked RNNs (and torch Transformer
layers, whose inference fast path would skip dropout). Every module's ``training`` flag is restored on exit.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2), nn.BatchNorm1d(2))
    >>> out = mc_predict(model, torch.randn(4, 3), n_samples=8)
    >>> out.mean.shape, out.std.shape, model[3].training
    (torch.Size([4, 2]), torch.Size([4, 2]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_dropout._trace import call_model
from lightning_dropout.errors import check_int
from lightning_dropout.rules import is_dropout_module

__all__ = ["MCPrediction", "mc_dropout", "mc_predict", "predictive_entropy"]

_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder)


def _stochastic(module: nn.Module) -> bool:
    if is_dropout_module(module) or isinstance(module, _TRANSFORMER_LAYERS):
        return True
    return isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and float(module.dropout) > 0


@contextmanager
def mc_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` is in eval mode except its dropout, which samples."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for module in model.modules():
            if _stochastic(module):
                module.training = True
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


class MCPrediction(NamedTuple):
    """Mean and standard deviation over the MC samples (and the samples when asked for)."""

    mean: Tensor
    std: Tensor
    samples: Tensor | None = None


@torch.no_grad()
def mc_predict(
    model: nn.Module,
    x: Any,
    n_samples: int = 30,
    transform: Callable[[Tensor], Tensor] | None = None,
    keep_samples: bool = False,
) -> MCPrediction:
    """Run ``n_samples`` stochastic forward passes with only dropout active.

    Args:
        model: any module (injected or not).
        x: its input (a tensor, a tuple of positional args or a dict of kwargs).
        n_samples: number of passes, >= 2.
        transform: applied to each output before averaging, e.g. ``lambda z: z.softmax(-1)`` for class
            probabilities.
        keep_samples: also return the stacked samples ``(n_samples, *output_shape)``.

    Returns:
        :class:`MCPrediction` with ``mean`` and ``std`` of shape ``output_shape``.
    """
    check_int(n_samples, "n_samples", 2)
    outs = []
    with mc_dropout(model):
        for _ in range(n_samples):
            out = call_model(model, x)
            outs.append(transform(out) if transform is not None else out)
    stacked = torch.stack(outs)
    return MCPrediction(stacked.mean(0), stacked.std(0), stacked if keep_samples else None)


def predictive_entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Entropy ``-sum p log p`` of the mean predictive distribution along ``dim`` (nats)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim)
