"""Re-running a study's candidates over fresh seeds, the same seeds for every candidate (a paired comparison
with common random numbers), and storing the values on the study for :mod:`~lightning_dropout.tune.selection`
to choose the winner from."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna

from lightning_dropout.tune.config import StudyConfig
from lightning_dropout.tune.fixed import own_dropout
from lightning_dropout.tune.records import (
    BASELINE_AS_WRITTEN,
    BASELINE_ATTR,
    RERUNS_ATTR,
    SEARCH_ATTR,
    candidates,
    plan_amount,
    rerun_candidates,
    stored_plan,
    trial_label,
)
from lightning_dropout.tune.selection import Candidate

if TYPE_CHECKING:
    from lightning_dropout.tune.runner import Tuner

__all__ = ["rerun", "rerun_seeds"]


def rerun_seeds(cfg: StudyConfig) -> list[int]:
    """The re-run seeds, the same for every candidate (paired comparison, common random numbers)."""
    return [cfg.seed + 1000 * (i + 1) for i in range(cfg.seeds)]


def rerun(tuner: Tuner, study: optuna.Study, on_done: Callable[[str], None] | None = None) -> list[Candidate]:
    """Re-run the candidates over the ``study.seeds`` seeds of :func:`rerun_seeds`; store the values (and the
    seeds, and each plan's amount of dropout) on the study; best mean first. A resumed study re-runs only what
    is missing."""
    cfg = tuner.study_config
    tuner.pin_threads()
    stored: dict[str, Any] = dict(study.user_attrs.get(RERUNS_ATTR, {}))
    seeds = rerun_seeds(cfg)
    for trial in candidates(study, cfg.top_k):
        key = str(trial.number)
        info = dict(stored.get(key, {}))
        values = list(info.get("values", []))
        plan = stored_plan(trial)
        if "amount" not in info:
            as_written = trial.user_attrs.get(BASELINE_ATTR) == BASELINE_AS_WRITTEN
            info["amount"] = own_dropout(tuner.cli.fresh().model) if as_written else plan_amount(plan)
        for i in range(len(values), cfg.seeds):
            result = tuner.run_plan(
                plan,
                seeds[i],
                version=f"rerun_{trial.number:04d}_seed{i}",
                number=trial.number,
                values=trial.user_attrs.get(SEARCH_ATTR),
            )
            values.append(result.value if result.value is not None else math.nan)
            info.update(label=trial_label(trial), values=values, seeds=seeds[: len(values)])
            stored[key] = info
            study.set_user_attr(RERUNS_ATTR, stored)
            if on_done is not None:
                on_done(f"{trial_label(trial)} seed {i + 1}/{cfg.seeds}")
    return rerun_candidates(study)
