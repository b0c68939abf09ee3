"""MC-dropout uncertainty on the validation set: :class:`UncertaintyMonitor` (a Lightning callback; no Optuna).

It runs MC dropout (:func:`~lightning_dropout.mc.mc_predict`) on the validation set and logs the expected
calibration error (torchmetrics) and the predictive entropy; BatchNorm stays in eval mode and training is left
untouched (:func:`~lightning_dropout.passes.untouched`). Also importable from :mod:`lightning_dropout.monitor`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_dropout.errors import DropoutConfigError, check_int
from lightning_dropout.mc import mc_dropout, predictive_entropy
from lightning_dropout.passes import untouched

__all__ = ["UncertaintyMonitor"]

log = logging.getLogger(__name__)


def _default_unpack(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for x_key, y_key in (("x", "y"), ("input", "target"), ("inputs", "targets"), ("image", "label")):
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
    raise DropoutConfigError(
        "UncertaintyMonitor needs `(input, target)` batches (a tuple/list, or a dict with x/y, input/target, "
        f"inputs/targets or image/label keys), but got {type(batch).__name__}; pass `unpack=`."
    )


class UncertaintyMonitor(Callback):
    """MC-dropout uncertainty on the validation set for classifiers: after each validation during ``fit``
    (every ``every_n_epochs``), ``n_samples`` stochastic passes with only dropout active (BatchNorm stays in
    eval mode) and logs

    - ``mc/ece``: expected calibration error of the MC-averaged probabilities (torchmetrics, L1, ``n_bins``);
    - ``mc/ece_no_dropout``: the same for the deterministic (dropout off) probabilities, for comparison;
    - ``mc/entropy``: mean predictive entropy (nats) of the MC-averaged probabilities;
    - ``mc/accuracy``: accuracy of the MC-averaged prediction.

    Args:
        n_samples: stochastic passes per batch (>= 2).
        n_bins: calibration bins.
        every_n_epochs: run after every n-th validation epoch.
        unpack: ``batch -> (input, target)``; default handles ``(x, y)`` tuples and common dict keys. The
            module's ``forward(input)`` must return class logits ``(N, C)``.
    """

    def __init__(
        self,
        n_samples: int = 20,
        n_bins: int = 15,
        every_n_epochs: int = 1,
        unpack: Callable[[Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        for key, value, low in (
            ("n_samples", n_samples, 2),
            ("n_bins", n_bins, 1),
            ("every_n_epochs", every_n_epochs, 1),
        ):
            check_int(value, key, low)
        self.n_samples = n_samples
        self.n_bins = n_bins
        self.every_n_epochs = every_n_epochs
        self.unpack = unpack or _default_unpack
        self.history: list[dict[str, float]] = []

    def __repr__(self) -> str:
        return f"UncertaintyMonitor(n_samples={self.n_samples}, n_bins={self.n_bins})"

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        loaders = trainer.val_dataloaders
        if not isinstance(loaders, DataLoader):
            raise DropoutConfigError(
                f"UncertaintyMonitor needs one validation DataLoader, but got {type(loaders).__name__}."
            )
        with untouched(pl_module):
            values = self._measure(trainer, pl_module, loaders)
        self.history.append({"epoch": float(trainer.current_epoch), **values})
        trainer.callback_metrics.update(
            {k: torch.tensor(v, device=pl_module.device) for k, v in values.items()}
        )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader[Any]
    ) -> dict[str, float]:
        device = pl_module.device
        ece_mc: torchmetrics.Metric | None = None
        ece_det: torchmetrics.Metric | None = None
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # entropy sum, correct, count
        pl_module.eval()  # mc_dropout() restores these flags after each batch's stochastic passes
        with torch.no_grad():
            for batch in loader:
                x, y = self.unpack(trainer.strategy.batch_to_device(batch))
                det = pl_module(x).softmax(-1)
                with mc_dropout(pl_module):
                    probs = torch.stack([pl_module(x).softmax(-1) for _ in range(self.n_samples)]).mean(0)
                if ece_mc is None:
                    classes = probs.shape[-1]
                    ece_mc, ece_det = (
                        torchmetrics.classification.MulticlassCalibrationError(
                            classes, n_bins=self.n_bins
                        ).to(device)
                        for _ in range(2)
                    )
                assert ece_det is not None
                ece_mc.update(probs, y)
                ece_det.update(det, y)
                totals += torch.stack(
                    [
                        predictive_entropy(probs).sum(),
                        (probs.argmax(-1) == y).sum(),
                        torch.tensor(y.numel(), device=device),
                    ]
                ).to(torch.float64)
        if ece_mc is None or ece_det is None:
            raise DropoutConfigError("UncertaintyMonitor found no validation batches.")
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        entropy, correct, count = totals.tolist()
        return {
            "mc/ece": float(ece_mc.compute()),
            "mc/ece_no_dropout": float(ece_det.compute()),
            "mc/entropy": entropy / count,
            "mc/accuracy": correct / count,
        }
