"""The trials a study runs before its sampler: the baselines (no dropout, and the model's own dropout as
written), the warm-start grid of uniform rates (``study.warm_start``) and the user's own trials
(``study.enqueue``). Each carries a label in its user attributes; they are enqueued once per study and never
pruned.

Two processes that start on one storage at the same moment can both see an empty study and both enqueue the
same labels (Optuna's storages have no compare-and-set on a study). The first trial of a label (the lowest
number) runs; :func:`duplicate_of` finds a later twin, which the runner records as failed with
:data:`~lightning_dropout.tune.records.DUPLICATE` without training it, and which does not count towards
``n_trials``.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from lightning_dropout.injection import Rule, existing_rate, is_dropout_module, resolve
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.tune.budget import grid_points, grid_size
from lightning_dropout.tune.config import DropoutSpace, StudyConfig
from lightning_dropout.tune.records import (
    BASELINE_AS_WRITTEN,
    BASELINE_ATTR,
    BASELINE_NONE,
    ENQUEUED_ATTR,
    FIXED_PLAN_ATTR,
    WARM_START_ATTR,
    fixed_label,
)
from lightning_dropout.tune.selection import UNIFORM_PREFIX
from lightning_dropout.tune.space import uniform_params

__all__ = ["baseline_plans", "duplicate_of", "enqueue_fixed", "own_dropout", "race_references"]

log = logging.getLogger(__name__)

_ALIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def own_dropout(model: torch.nn.Module) -> float:
    """The sum of the rates of the dropout a model has as written (modules, attention and RNN dropout)."""
    return sum(
        existing_rate(m) or 0.0
        for m in model.modules()
        if is_dropout_module(m) or isinstance(m, (torch.nn.MultiheadAttention, torch.nn.RNNBase))
    )


def baseline_plans(model: torch.nn.Module) -> dict[str, DropoutPlan]:
    """The baselines every study compares against: no dropout at all, and the model's own dropout as written
    (only when it has some: inert ``p=0`` slots, like those of the Transformer zoo model, do not count)."""
    if not own_dropout(model) > 0:
        return {BASELINE_NONE: DropoutPlan()}
    off = resolve(model, [Rule(replace=True, p=0.0)])
    return {BASELINE_NONE: off, BASELINE_AS_WRITTEN: DropoutPlan()}


def _wanted(
    cfg: StudyConfig, space: DropoutSpace, model: torch.nn.Module
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, params, user attributes) of every fixed trial the config asks for, baselines first."""
    wanted: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    if cfg.baselines:
        wanted += [(name, {}, {BASELINE_ATTR: name}) for name in baseline_plans(model)]
    if cfg.warm_start and cfg.warm_start_rates:
        example = getattr(model, "example_input_array", None)
        seen: list[dict[str, Any]] = []
        rates = cfg.warm_start_rates
        if cfg.budget is not None:  # one grid point per 5 trainings of the budget, spread over the rates
            rates = grid_points(rates, grid_size(cfg.budget, len(rates)))
        for rate in rates:
            params = uniform_params(space.groups, model, rate, example)
            if params not in seen:  # a rate clipped into the groups' ranges onto an earlier point
                seen.append(params)
                label = f"{UNIFORM_PREFIX}{rate:g}"
                wanted.append((label, params, {WARM_START_ATTR: label}))
    for i, item in enumerate(cfg.enqueue):
        label = f"enqueued #{i + 1}"
        if "params" in item:
            wanted.append((label, item["params"], {ENQUEUED_ATTR: label}))
        else:
            plan = DropoutPlan.from_dict(item).to_yaml()
            wanted.append((label, {}, {ENQUEUED_ATTR: label, FIXED_PLAN_ATTR: plan}))
    return wanted


def enqueue_fixed(study: optuna.Study, cfg: StudyConfig, space: DropoutSpace, model: torch.nn.Module) -> None:
    """Enqueue, once per study, the fixed trials that are not in it yet: the baselines always (when
    ``study.baselines``), then the warm-start grid and the user's trials as far as ``n_trials`` leaves room (a
    warning names what did not fit). ``model`` is a freshly built model of the config."""
    trials = study.get_trials(deepcopy=False, states=_ALIVE)
    present = {fixed_label(t) for t in trials} - {None}
    missing = [w for w in _wanted(cfg, space, model) if w[0] not in present]
    baselines = [w for w in missing if BASELINE_ATTR in w[2]]
    others = [w for w in missing if BASELINE_ATTR not in w[2]]
    room = len(others) if cfg.n_trials is None else max(cfg.n_trials - len(trials) - len(baselines), 0)
    for _label, params, attrs in baselines + others[:room]:
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
    if len(others) > room:
        left = [w[0] for w in others[room:]]
        log.warning("study.n_trials=%d leaves no room for the enqueued trials %s", cfg.n_trials, left)


def race_references(cfg: StudyConfig, model: torch.nn.Module) -> int:
    """The candidates that race over seeds whatever the trials find: the baselines and the best grid point."""
    baselines = len(baseline_plans(model)) if cfg.baselines else 0
    return baselines + int(bool(cfg.warm_start and cfg.warm_start_rates))


def duplicate_of(trial: optuna.Trial) -> int | None:
    """The number of an earlier live (complete, pruned, running or waiting) trial with this fixed trial's label,
    so this one must not run, or ``None``. A failed one does not count: the heartbeat's retry of a killed
    worker's trial (which keeps its label) and the re-run of an interrupted one must run."""
    label = fixed_label(trial)
    if label is None:
        return None
    earlier = [
        t.number
        for t in trial.study.get_trials(deepcopy=False)
        if t.number < trial.number and fixed_label(t) == label and t.state in _ALIVE
    ]
    return min(earlier, default=None)
