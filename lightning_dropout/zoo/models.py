"""Example LightningModules for MNIST-1D, without any dropout of their own.

The architectures follow the models of the MNIST-1D paper and its notebooks (Greydanus 2020, "Scaling down
deep learning"): an MLP with a residual hidden layer, a small 1-D CNN ("ConvBase"), a bidirectional GRU
whose outputs at every time step feed a linear head, plus a small Transformer encoder. None of them contains
active dropout (the Transformer's built-in dropout modules and attention dropout are kept at ``p=0`` as
slots that a ``Rule(replace=...)`` can fill): lightning-dropout is what injects dropout. Every layer is a
named attribute so that rules can target it, and each model's output layer is the
last module its ``__init__`` defines (``linear3`` for :class:`MLP`, ``head`` for the others).

Parameter counts with the default arguments:

=====================================  ==========
Model                                  Parameters
=====================================  ==========
:class:`MLP`                           15,210
:class:`CNN`                           5,210
:class:`GRU`                           5,134
:class:`TransformerEncoderClassifier`  18,762
=====================================  ==========
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_dropout.errors import DropoutConfigError, check_int, check_number

__all__ = ["CNN", "GRU", "MLP", "MNIST1DClassifier", "TransformerEncoderClassifier"]

NUM_CLASSES = 10
INPUT_LENGTH = 40


def _check_positive_int(**values: object) -> None:
    for name, value in values.items():
        check_int(value, name)


def _check_optim(lr: object, weight_decay: object) -> None:
    check_number(lr, "lr", 0)
    check_number(weight_decay, "weight_decay", 0, inclusive=True)


class MNIST1DClassifier(L.LightningModule):
    """Shared training, evaluation and optimiser logic of the MNIST-1D example models.

    Subclasses call ``super().__init__()`` first, then ``self.save_hyperparameters()`` (which must record
    ``lr`` and may record ``weight_decay``), then build their layers, and implement :meth:`forward` mapping
    ``(B, 40)`` inputs to ``(B, 10)`` logits.

    The loss is cross-entropy. Logged metrics: ``train_loss`` (per step and per epoch), ``val_loss``,
    ``val_acc`` (on the progress bar), ``test_loss`` and ``test_acc``; accuracy is torchmetrics'
    :class:`~torchmetrics.classification.MulticlassAccuracy` with ``average="micro"`` (the fraction of
    correctly classified sequences, as reported in the paper), kept separately for validation and test.
    The optimiser is Adam with ``lr`` and ``weight_decay`` (default ``0.0``) from the hyperparameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.example_input_array = torch.zeros(2, INPUT_LENGTH)

    @override
    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x) -> logits.")

    def _loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logits, y = self._loss(batch)
        self.val_acc(logits, y)
        self.log("val_loss", loss, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)
        return loss

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logits, y = self._loss(batch)
        self.test_acc(logits, y)
        self.log("test_loss", loss, sync_dist=True)
        self.log("test_acc", self.test_acc)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hparams = self.hparams
        return torch.optim.Adam(
            self.parameters(), lr=hparams["lr"], weight_decay=hparams.get("weight_decay", 0.0)
        )


class MLP(MNIST1DClassifier):
    """The MNIST-1D paper's MLP: two hidden layers of ``hidden`` units, the second one residual.

    ``x (B, 40) -> h = relu(linear1(x)) -> h = h + relu(linear2(h)) -> linear3(h) (B, 10)``, as in
    Greydanus 2020, "Scaling down deep learning" (MNIST-1D). 15,210 parameters with ``hidden=100``.

    Args:
        hidden: Width of both hidden layers.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.

    Example:
        >>> import torch
        >>> MLP()(torch.zeros(8, 40)).shape
        torch.Size([8, 10])
    """

    def __init__(self, hidden: int = 100, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        _check_positive_int(hidden=hidden)
        _check_optim(lr, weight_decay)
        super().__init__()
        self.save_hyperparameters()
        self.linear1 = nn.Linear(INPUT_LENGTH, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, NUM_CLASSES)

    @override
    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x).relu()
        h = h + self.linear2(h).relu()
        logits: Tensor = self.linear3(h)
        return logits


def _conv_out(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class CNN(MNIST1DClassifier):
    """The MNIST-1D paper's ``ConvBase``: three strided 1-D convolutions and a linear head.

    ``x (B, 40) -> (B, 1, 40) -> conv1 (k=5, s=2, p=1) -> (B, C, 19) -> conv2 (k=3, s=2, p=1) -> (B, C, 10)
    -> conv3 (k=3, s=2, p=1) -> (B, C, 5) -> flatten (B, 5C) -> head (B, 10)``, each convolution followed by
    a ReLU, as in Greydanus 2020, "Scaling down deep learning" (MNIST-1D). 5,210 parameters with
    ``channels=25``.

    Args:
        channels: Channels of every convolution.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.

    Example:
        >>> import torch
        >>> CNN()(torch.zeros(8, 40)).shape
        torch.Size([8, 10])
    """

    def __init__(self, channels: int = 25, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        _check_positive_int(channels=channels)
        _check_optim(lr, weight_decay)
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        length = INPUT_LENGTH
        for kernel in (5, 3, 3):  # 40 -> 19 -> 10 -> 5
            length = _conv_out(length, kernel, stride=2, padding=1)
        self.head = nn.Linear(channels * length, NUM_CLASSES)

    @override
    def forward(self, x: Tensor) -> Tensor:
        h = x.unsqueeze(1)
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        logits: Tensor = self.head(h.flatten(1))
        return logits


class GRU(MNIST1DClassifier):
    """The MNIST-1D paper's GRU: a (bidirectional) GRU read out at every time step by a linear head.

    ``x (B, 40) -> (B, 40, 1) -> gru -> (B, 40, D * hidden) -> flatten (B, 40 * D * hidden) -> head (B, 10)``
    with ``D = 2`` when ``bidirectional``, as in Greydanus 2020, "Scaling down deep learning" (MNIST-1D).
    5,134 parameters with ``hidden=6, bidirectional=True``.

    Args:
        hidden: Hidden size of the GRU (per direction).
        bidirectional: Run the GRU in both directions.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.

    Example:
        >>> import torch
        >>> GRU()(torch.zeros(8, 40)).shape
        torch.Size([8, 10])
    """

    def __init__(
        self, hidden: int = 6, bidirectional: bool = True, lr: float = 1e-2, weight_decay: float = 0.0
    ) -> None:
        _check_positive_int(hidden=hidden)
        _check_optim(lr, weight_decay)
        if not isinstance(bidirectional, bool):
            raise DropoutConfigError(
                f"`bidirectional` must be a bool, but got bidirectional={bidirectional!r}."
            )
        super().__init__()
        self.save_hyperparameters()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=bidirectional)
        directions = 2 if bidirectional else 1
        self.head = nn.Linear(INPUT_LENGTH * directions * hidden, NUM_CLASSES)

    @override
    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        logits: Tensor = self.head(out.flatten(1))
        return logits


class TransformerEncoderClassifier(MNIST1DClassifier):
    """A small Transformer encoder over the 40 points of an MNIST-1D sequence.

    Not one of the paper's models, but sized like them for Greydanus 2020, "Scaling down deep learning"
    (MNIST-1D): ``x (B, 40) -> (B, 40, 1) -> embed (B, 40, d_model) + pos_embedding -> encoder
    (num_layers post-norm layers, ReLU feed-forward) -> mean over the 40 positions -> head (B, 10)``.
    18,762 parameters with the defaults.

    The encoder layers are built with ``dropout=0.0``: their ``nn.Dropout`` modules (``dropout``,
    ``dropout1``, ``dropout2``) and the attention dropout stay in place at ``p=0``, inert slots that ``Rule(replace=True)``
    can fill.

    Args:
        d_model: Embedding width.
        nhead: Attention heads; must divide ``d_model``.
        num_layers: Encoder layers.
        dim_feedforward: Hidden width of each layer's feed-forward block.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.

    Example:
        >>> import torch
        >>> TransformerEncoderClassifier()(torch.zeros(8, 40)).shape
        torch.Size([8, 10])
    """

    def __init__(
        self,
        d_model: int = 32,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        _check_positive_int(
            d_model=d_model, nhead=nhead, num_layers=num_layers, dim_feedforward=dim_feedforward
        )
        _check_optim(lr, weight_decay)
        if d_model % nhead:
            raise DropoutConfigError(f"`nhead` must divide `d_model`, but got {d_model=} and {nhead=}.")
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(1, d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(1, INPUT_LENGTH, d_model))
        nn.init.normal_(self.pos_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=dim_feedforward, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    @override
    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.unsqueeze(-1)) + self.pos_embedding
        h = self.encoder(h)
        logits: Tensor = self.head(h.mean(dim=1))
        return logits
