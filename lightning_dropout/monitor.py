"""What TensorBoard should show about dropout: the generalization gap measured correctly (a Lightning callback;
no Optuna). MC-dropout uncertainty is :class:`~lightning_dropout.uncertainty.UncertaintyMonitor`.

Most tools plot the training loss, measured with dropout on, against the validation loss, measured with it
off, and call the difference a generalization gap. Dropout inflates the first, so that "gap" shrinks or turns
negative exactly when dropout is strong. :class:`GapMonitor` instead evaluates a fixed subset of the *training*
data the way validation does (dropout off, the module's own ``validation_step`` and metrics) and logs

- ``train_clean/<metric>``: the training subset, dropout off;
- ``gap/<metric>`` = ``val_<metric>`` - ``train_clean/<metric>``;
- ``train_dropout/<metric>``: the same subset with dropout on (``train_mode=True``), the figure the naive gap
  uses, labelled as such so the two can be compared;
- ``timing/gap_seconds``: the time the extra passes took.

``<metric>`` is each name the module's ``validation_step`` logs with a ``val_``/``val/``/``valid_``/
``validation_`` prefix stripped (``val_loss`` -> ``loss``). The monitor does not change training: the extra
passes draw from forked random number generators (global and each dropout site's own), leave BatchNorm in
eval mode and the module's torchmetrics states as they were.

Under DDP every rank evaluates its own shard; sums are reduced across ranks (torchmetrics states are synced
by torchmetrics) and only rank 0 writes to the loggers. The values also go to ``trainer.callback_metrics``, so
``ModelCheckpoint``, ``EarlyStopping`` or a tuning study can monitor ``gap/loss``.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from lightning_dropout.errors import DropoutConfigError, check_int
from lightning_dropout.mc import mc_dropout
from lightning_dropout.passes import metric_modules, untouched
from lightning_dropout.scalars import GAP_CATEGORY, gap_layout, write_layout

__all__ = ["GapMonitor", "LogCapture", "metric_base_name"]

log = logging.getLogger(__name__)

GAP_PREFIX = "gap/"  # the tag of each metric's gap: gap/<metric base name>
TIMING_TAG = "timing/gap_seconds"  # the extra passes' time: not a gap, so not under `gap/`
_VAL_PREFIXES = ("validation_", "validation/", "valid_", "valid/", "val_", "val/", "val-")
_REDUCE = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


def metric_base_name(name: str) -> str:
    """``val_acc`` -> ``acc``, ``val/loss`` -> ``loss``; names without a validation prefix stay as they are.

    >>> metric_base_name("val_acc"), metric_base_name("validation/loss"), metric_base_name("f1")
    ('acc', 'loss', 'f1')
    """
    for prefix in _VAL_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix) :]
    return name


def _reduce_name(reduce_fx: Any) -> str:
    name = reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", "")
    if name not in _REDUCE:
        raise DropoutConfigError(
            f"GapMonitor supports `reduce_fx` in {sorted(_REDUCE)} (or the torch functions of those names), "
            f"but a metric was logged with {reduce_fx!r}."
        )
    return _REDUCE[name]


class LogCapture:
    """Stands in for ``LightningModule.log`` while ``validation_step`` runs on training data: collects the
    values instead of sending them to Lightning (whose validation results are already final)."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}  # name -> [weighted sum or extreme, weight]
        self.reduce: dict[str, str] = {}
        self.metrics: dict[str, torchmetrics.Metric] = {}
        self.batch: Any = None

    def __call__(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: Any = "mean",
        *args: Any,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(value, torchmetrics.Metric):
            self.metrics[name] = value
            return
        if isinstance(value, Tensor):
            if value.numel() != 1:
                return
            value = float(value.detach())
        if not isinstance(value, numbers.Number) or isinstance(value, bool):
            return
        value = float(value)  # type: ignore[arg-type]  # numpy scalars too, as Lightning accepts them
        op = _reduce_name(reduce_fx)
        weight = float(batch_size if batch_size is not None else extract_batch_size(self.batch))
        total = self.totals.setdefault(name, [math.nan if op in ("max", "min") else 0.0, 0.0])
        self.reduce[name] = op
        if op == "mean":
            total[0] += value * weight
        elif op == "sum":
            total[0] += value
        elif math.isnan(total[0]):
            total[0] = value
        else:
            total[0] = max(total[0], value) if op == "max" else min(total[0], value)
        total[1] += weight


class GapMonitor(Callback):
    """Log the generalization gap measured correctly: validation metrics minus the same metrics on a fixed
    subset of the training data evaluated the way validation does (dropout off).

    Works with any LightningModule whose ``validation_step`` logs its metrics (tensors, numbers or
    torchmetrics objects), with no change to the module. Runs after each validation during ``fit``.

    Args:
        num_samples: training examples in the fixed subset (drawn once, with ``seed``); the cost grows
            linearly with it (``benchmarks/monitor.py``).
        train_mode: also evaluate the subset with dropout on (BatchNorm still in eval mode) and log it as
            ``train_dropout/<metric>``: the figure a naive gap uses.
        seed: chooses the subset (its own generator: the global random state is not touched).
        batch_size: batch size of the extra passes; default the validation loader's (what validation is known
            to fit in memory with), else the training loader's. The collated batches are kept (on the host)
            for the whole fit, so later validations skip indexing and collation.

    Attributes:
        history: one dict of logged values per validation.
        seconds: time spent in the extra passes so far (each validation's logged as ``timing/gap_seconds``:
            a timing, kept out of the ``gap/`` group of gaps).
    """

    def __init__(
        self, num_samples: int = 256, train_mode: bool = True, seed: int = 0, batch_size: int | None = None
    ) -> None:
        check_int(num_samples, "num_samples")
        check_int(batch_size, "batch_size", or_none="None")
        self.num_samples = num_samples
        self.train_mode = bool(train_mode)
        self.seed = int(seed)
        self.batch_size = batch_size
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self._fit_started: float | None = None
        self._batches: list[Any] | None = None
        self._subset_size = num_samples
        self._layout_written = False

    def __repr__(self) -> str:
        return f"GapMonitor(num_samples={self.num_samples}, train_mode={self.train_mode}, seed={self.seed})"

    # -- the subset --------------------------------------------------------------------------------------------
    def _subset_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The subset's collated batches, built once per fit and kept on the host: later validations skip
        indexing, transforms and collation (a fixed subset: augmentation is drawn once)."""
        if self._batches is None:
            self._batches = list(self._subset_loader(trainer))
        return self._batches

    def _subset_loader(self, trainer: pl.Trainer) -> DataLoader[Any]:
        source = trainer.train_dataloader
        if not isinstance(source, DataLoader):
            raise DropoutConfigError(
                "GapMonitor needs the training data as a single DataLoader, but `train_dataloader()` gave "
                f"{type(source).__name__}."
            )
        dataset = source.dataset
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise DropoutConfigError(
                "GapMonitor needs a map-style training dataset (with `len`) to draw a fixed subset from, but "
                f"got {type(dataset).__name__}."
            ) from None
        world, rank = trainer.world_size, trainer.global_rank
        count = min(self.num_samples, size)
        if count < world:
            raise DropoutConfigError(
                f"GapMonitor needs at least one training example per process, but num_samples={count} < "
                f"world size {world}."
            )
        chosen = (
            torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))[:count].sort().values
        )
        self._subset_size = count
        shard = chosen[rank::world].tolist()  # every rank its own examples, like a DistributedSampler
        # the batch size validation runs with: known to fit in memory for evaluation
        val = trainer.val_dataloaders
        val_batch = val.batch_size if isinstance(val, DataLoader) else None
        batch_size = self.batch_size or val_batch or source.batch_size or 64
        return DataLoader(
            Subset(dataset, shard),
            batch_size=min(batch_size, len(shard)),
            shuffle=False,
            collate_fn=source.collate_fn,
            num_workers=0,
        )

    # -- one pass ----------------------------------------------------------------------------------------------
    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dropout_on: bool
    ) -> dict[str, float]:
        """The module's own ``validation_step`` over the subset; returns each logged value over the whole
        subset (all ranks)."""
        capture = LogCapture()
        batches = self._subset_batches(trainer)
        for metric in metric_modules(pl_module):
            metric.reset()
        pl_module.log = capture  # type: ignore[method-assign]  # instance attribute shadows the method
        try:
            with torch.no_grad():
                pl_module.eval()
                context = mc_dropout(pl_module) if dropout_on else nullcontext()
                with context:
                    for batch_idx, batch in enumerate(batches):
                        batch = trainer.strategy.batch_to_device(batch)
                        capture.batch = batch
                        pl_module.validation_step(batch, batch_idx)
        finally:
            del pl_module.log
        return self._reduce(trainer, capture)

    @staticmethod
    def _reduce(trainer: pl.Trainer, capture: LogCapture) -> dict[str, float]:
        out: dict[str, float] = {}
        names = sorted(capture.totals)
        if names:
            device = trainer.strategy.root_device
            for op in ("mean", "sum", "max", "min"):
                chosen = [n for n in names if capture.reduce[n] == op]
                if not chosen:
                    continue
                t = torch.tensor([capture.totals[n] for n in chosen], dtype=torch.float64, device=device)
                dist_op: dict[str, Any] = {
                    "mean": "sum",
                    "sum": "sum",
                    "max": torch.distributed.ReduceOp.MAX,
                    "min": torch.distributed.ReduceOp.MIN,
                }
                if trainer.world_size > 1:
                    t = trainer.strategy.reduce(t, reduce_op=dist_op[op])
                for name, (value, weight) in zip(chosen, t.tolist(), strict=True):
                    out[name] = value / weight if op == "mean" and weight > 0 else value
        for name in sorted(capture.metrics):
            out[name] = float(capture.metrics[name].compute())  # torchmetrics syncs across ranks
        return out

    # -- hooks -------------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._batches = None
        self._layout_written = False

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        started = time.perf_counter()
        with untouched(pl_module):
            clean = self._evaluate(trainer, pl_module, dropout_on=False)
            noisy = self._evaluate(trainer, pl_module, dropout_on=True) if self.train_mode else {}
        values: dict[str, float] = {}
        overlays: dict[str, str] = {}  # base name -> validation tag, for the Custom Scalars chart
        for name, value in clean.items():
            base = metric_base_name(name)
            values[f"train_clean/{base}"] = value
            val = trainer.callback_metrics.get(name)
            if val is not None and val.numel() == 1:
                values[f"{GAP_PREFIX}{base}"] = float(val) - value
                overlays[base] = name
            if name in noisy:
                values[f"train_dropout/{base}"] = noisy[name]
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        values[TIMING_TAG] = elapsed
        self.history.append({"epoch": float(trainer.current_epoch), **values})
        device = pl_module.device
        trainer.callback_metrics.update({k: torch.tensor(v, device=device) for k, v in values.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
                if isinstance(logger, TensorBoardLogger) and not self._layout_written:
                    # "Custom Scalars": val, train_clean and train_dropout of each metric on one chart
                    charts = gap_layout(overlays, dropout_on=self.train_mode)
                    write_layout(logger.experiment, GAP_CATEGORY, charts)
            self._layout_written = True

    def gaps_at(self, index: int) -> dict[str, float]:
        """The gaps of the ``index``-th validation of the fit, by metric base name (``{"loss": 0.21, "acc":
        -0.05}``); ``{}`` when there is none (what a tuner records at its best epoch)."""
        if not -len(self.history) <= index < len(self.history):
            return {}
        return {k[len(GAP_PREFIX) :]: v for k, v in self.history[index].items() if k.startswith(GAP_PREFIX)}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_started is None or not self.history:
            return
        total = time.perf_counter() - self._fit_started
        log.info(
            "GapMonitor: %d evaluations of %d training examples took %.2f s, %.1f%% of the fit's %.1f s",
            len(self.history),
            self._subset_size,
            self.seconds,
            100 * self.seconds / max(total, 1e-9),
            total,
        )


def __getattr__(name: str) -> Any:
    """``lightning_dropout.monitor.UncertaintyMonitor``, the former path: still importable for one release."""
    if name == "UncertaintyMonitor":
        import warnings

        from lightning_dropout.uncertainty import UncertaintyMonitor

        warnings.warn(
            "lightning_dropout.monitor.UncertaintyMonitor moved to lightning_dropout.uncertainty.UncertaintyMonitor; "
            "the old path goes in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return UncertaintyMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
