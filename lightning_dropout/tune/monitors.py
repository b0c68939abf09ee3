"""The callbacks a trial runs to measure more than its metric, switched on by the study config, and what each
adds to the trial's record. A new per-trial value is a :class:`~lightning_dropout.tune.config.StudyConfig`
field, its callback, and a branch in :class:`TrialMonitors`: nothing else in the tuner changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lightning.pytorch.callbacks import Callback

from lightning_dropout.monitor import GapMonitor, metric_base_name
from lightning_dropout.tune.config import StudyConfig
from lightning_dropout.uncertainty import UncertaintyMonitor

__all__ = ["TrialMonitors"]


class TrialMonitors:
    """The per-trial monitors ``cfg`` asks for: :attr:`callbacks` for the trial's Trainer, the values they add
    to the trial's metrics (:meth:`at_best`), and its HParams metrics (:meth:`hparam_metrics`: the same keys
    for every trial of the study, NaN where a trial has none).

    * ``gap_samples``: a :class:`~lightning_dropout.monitor.GapMonitor`; the record keeps the generalization
      gap of the study's metric and of the loss at the trial's best validation.
    * ``mc_samples``: an :class:`~lightning_dropout.uncertainty.UncertaintyMonitor`, which logs its curves
      itself and adds nothing to the record.
    """

    def __init__(self, cfg: StudyConfig) -> None:
        self.gap = GapMonitor(cfg.gap_samples, seed=cfg.seed) if cfg.gap_samples else None
        self.uncertainty = UncertaintyMonitor(cfg.mc_samples) if cfg.mc_samples else None
        self._gaps = sorted({metric_base_name(cfg.metric), "loss"})

    @property
    def callbacks(self) -> list[Callback]:
        return [m for m in (self.gap, self.uncertainty) if m is not None]

    def at_best(self, index: int | None) -> dict[str, float]:
        """The monitors' values at the trial's best validation (``index`` into its validations; ``None`` when
        it had none), for the trial's metrics."""
        if self.gap is None or index is None:
            return {}
        return {f"gap_at_best/{name}": value for name, value in self.gap.gaps_at(index).items()}

    def hparam_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The HParams metrics the monitors add, read from a trial's ``metrics`` (NaN when it has none)."""
        if self.gap is None:
            return {}
        return {f"hp/gap_at_best/{name}": metrics.get(f"gap_at_best/{name}", math.nan) for name in self._gaps}
