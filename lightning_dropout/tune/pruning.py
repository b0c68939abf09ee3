"""Reporting a trial's metric to Optuna after each validation and stopping the run when the pruner says so
(a Lightning callback, DDP-safe)."""

from __future__ import annotations

import lightning.pytorch as pl
import optuna
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.tune import ctrl_c
from lightning_dropout.tune.value import best_index

__all__ = ["MetricNotLoggedError", "TrialPruning"]


class MetricNotLoggedError(DropoutConfigError):
    """The study's metric is not logged: every trial would fail the same way, so the study stops."""


class TrialPruning(Callback):
    """Report the monitored metric to an Optuna trial after each validation; stop when it should be pruned.

    Only rank 0 talks to the study; the decision reaches every rank through ``strategy.broadcast`` and stops
    the run gracefully (``trainer.should_stop``), so no rank is left waiting in a collective. The caller
    raises ``optuna.TrialPruned`` after ``fit`` when :attr:`pruned` is set.

    Args:
        trial: the Optuna trial (``None`` on the other ranks, and for re-runs).
        monitor: the metric to report.
        direction: ``maximize`` or ``minimize``.
        prune_after: the pruner is not asked before this share of ``max_epochs`` (dropout learns slower at
            first, so early values are biased against it).
        prunable: ``False`` for fixed trials (baselines, the warm-start grid, enqueued trials): they report
            every value, so the pruner can compare against them, but always run to the end.
    """

    def __init__(
        self,
        trial: optuna.Trial | None,
        monitor: str,
        direction: str,
        prune_after: float = 0.0,
        prunable: bool = True,
    ) -> None:
        self.trial = trial
        self.monitor = monitor
        self.maximize = direction == "maximize"
        self.prune_after = prune_after
        self.prunable = prunable
        self.pruned = False
        self.history: list[float] = []  # one value per validation
        self.epochs: list[int] = []  # the epoch of each

    def best(self) -> float | None:
        index = self.best_index()
        return None if index is None else self.history[index]

    def best_index(self) -> int | None:
        """The index (validation number) of the best finite value so far."""
        return best_index(self.history, self.maximize)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise MetricNotLoggedError(
                f"`study.metric` must be a metric the module logs during validation, but {self.monitor!r} is not "
                f"among {sorted(trainer.callback_metrics)}."
            )
        score = float(value)
        self.history.append(score)
        self.epochs.append(trainer.current_epoch)
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            with ctrl_c.held():  # a storage write: a Ctrl-C waits for its end (tune/ctrl_c.py)
                self.trial.report(score, step=trainer.current_epoch)
                max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 0
                if self.prunable and trainer.current_epoch + 1 >= self.prune_after * max_epochs:
                    prune = self.trial.should_prune()
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned = True
            trainer.should_stop = True
