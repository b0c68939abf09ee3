"""TensorBoard for studies: one run per trial with a fixed HParams key set, and the study's figures as images.

TensorBoard's HParams dashboard takes its columns from one arbitrary run's experiment record and shows the
*last* scalar of each metric tag, so (see ``docs/architecture.md``):

* every trial of a study writes the same hyperparameter keys: the plan flattened over every site the search
  space can produce on the model (absent sites are filled with ``variant="none"``, ``p=0.0``), plus the trial's
  number, kind, baseline, seed and final state (``complete``/``pruned``/``failed``);
* the metrics are written once, when the trial has finished: the best validation value (not the last), the
  epoch it was reached and the generalization gap at that epoch (``GapMonitor``), so pruned and failed trials
  get a row too;
* Lightning's automatic ``log_hyperparams`` call (the module's ``hparams`` with a placeholder metric, at fit
  start) is folded into that single record instead of writing a second, conflicting one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from typing_extensions import override

from lightning_dropout.inject import resolve
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.tune.space import SearchGroup

__all__ = ["TrialLogger", "plan_columns", "plan_hparams"]

NO_VARIANT = "none"
NO_PARAM = "-"


def plan_columns(
    groups: Sequence[SearchGroup], model: nn.Module, example_input: Any = None
) -> dict[str, list[str]]:
    """Every site key the search space can produce on ``model`` (``"<target>:<where>"``, e.g. ``fc1:output``,
    ``fc1:weight`` for DropConnect), in model order, with the variant parameter names searched there."""
    columns: dict[str, list[str]] = {}
    for group in groups:
        for variant in group.variants:
            plan = resolve(model, [group.rule(variant, group.probe_rate)], example_input)
            searched = sorted(group.params.get(variant, {}))
            for site in plan:
                names = columns.setdefault(site.key, [])
                names.extend(n for n in searched if n not in names)
    return columns


def plan_hparams(plan: DropoutPlan, columns: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The plan as flat hyperparameters with the same keys for every plan of a study: ``dropout/<site>/variant``
    (``"none"`` when the plan has no site there), ``dropout/<site>/p`` (``0.0``) and ``dropout/<site>/<param>``
    (as text, ``"-"`` when absent: one type per column). Sites outside ``columns`` are added too.

    >>> from lightning_dropout.plan import Site
    >>> plan = DropoutPlan([Site("fc1", "output", "dropblock", 0.2, {"block_size": 3})])
    >>> plan_hparams(plan, {"fc1:output": ["block_size"], "fc2:output": []})
    {'dropout/fc1:output/variant': 'dropblock', 'dropout/fc1:output/p': 0.2, 'dropout/fc1:output/block_size': '3', 'dropout/fc2:output/variant': 'none', 'dropout/fc2:output/p': 0.0}
    """
    sites = {site.key: site for site in plan}
    keys = {k: list(v) for k, v in columns.items()}
    for key, present in sites.items():
        names = keys.setdefault(key, [])
        names.extend(n for n in sorted(present.params) if n not in names)
    out: dict[str, Any] = {}
    for key, names in keys.items():
        site = sites.get(key)
        out[f"dropout/{key}/variant"] = site.variant if site is not None else NO_VARIANT
        out[f"dropout/{key}/p"] = float(site.p) if site is not None else 0.0
        for name in names:
            value = site.params.get(name) if site is not None else None
            out[f"dropout/{key}/{name}"] = NO_PARAM if value is None else str(value)
    return out


class TrialLogger(TensorBoardLogger):
    """A TensorBoardLogger that writes one HParams record per run, when :meth:`finish` is called.

    Lightning's own ``log_hyperparams`` call (the module's and datamodule's ``hparams``) is kept and merged
    into that record under ``module/``; ``finalize`` is deferred to :meth:`finish`, so everything lands in
    one event file.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)
        self._module_hparams: dict[str, Any] = {}
        self._status = "success"

    @override
    def log_hyperparams(self, params: Any, metrics: Any = None) -> None:  # type: ignore[override]
        self._module_hparams.update(params if isinstance(params, Mapping) else vars(params))

    @override
    def finalize(self, status: str) -> None:
        self._status = status
        if self._experiment is not None:
            self.experiment.flush()

    def finish(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Write the run's single HParams record (``params`` plus the module's, ``metrics`` as scalars at
        step 0) and close the event file."""
        # Lightning flattens nested mappings (`module/<key>/...`) and turns other values into text
        module = {
            k: v for k, v in self._module_hparams.items() if v is not None and not k.startswith("_")
        }  # `_`: e.g. LightningCLI's `_instantiator`
        merged = {**({"module": module} if module else {}), **params}
        clean = {k: (float(v) if v is not None else math.nan) for k, v in metrics.items()}
        super().log_hyperparams(merged, clean)
        super().finalize(self._status)
