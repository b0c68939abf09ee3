"""Re-running a study's candidates over fresh seeds, the same seeds for every candidate (a paired comparison
with common random numbers), and storing the values on the study for :mod:`~lightning_dropout.tune.selection`
to choose the winner from.

The runs are independent, so the study's workers share them (:func:`rerun_share`, worker ``i`` of ``n`` taking
every ``n``-th run from the ``i``-th); each run's value is stored under its own study attribute, and :func:`rerun`
gathers them, runs whatever is still missing (a worker that died) and stores the table."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from lightning_dropout.tune.config import StudyConfig
from lightning_dropout.tune.fixed import own_dropout
from lightning_dropout.tune.records import (
    BASELINE_AS_WRITTEN,
    BASELINE_ATTR,
    RERUN_VALUE_PREFIX,
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

__all__ = ["RerunJob", "rerun", "rerun_jobs", "rerun_seeds", "rerun_share"]


def rerun_seeds(cfg: StudyConfig) -> list[int]:
    """The re-run seeds, the same for every candidate (paired comparison, common random numbers)."""
    return [cfg.seed + 1000 * (i + 1) for i in range(cfg.seeds)]


@dataclass(frozen=True)
class RerunJob:
    """One re-run: candidate ``trial`` with the ``index``-th re-run seed."""

    trial: optuna.trial.FrozenTrial
    index: int
    seed: int

    @property
    def key(self) -> str:
        """The study attribute its value is stored under."""
        return f"{RERUN_VALUE_PREFIX}{self.trial.number}:{self.index}"

    def run(self, tuner: Tuner) -> float:
        """Train it; the value (NaN when the run produced none)."""
        result = tuner.run_plan(
            stored_plan(self.trial),
            self.seed,
            version=f"rerun_{self.trial.number:04d}_seed{self.index}",
            number=self.trial.number,
            values=self.trial.user_attrs.get(SEARCH_ATTR),
        )
        return result.value if result.value is not None else math.nan

    def describe(self, seeds: int) -> str:
        return f"{trial_label(self.trial)} seed {self.index + 1}/{seeds}"


def rerun_jobs(study: optuna.Study, cfg: StudyConfig) -> list[RerunJob]:
    """Every re-run of the finished study, done or not, in a fixed order (candidate, then seed): the same list in
    every worker that reads the study, whatever the others have run meanwhile."""
    seeds = rerun_seeds(cfg)
    return [RerunJob(trial, i, seeds[i]) for trial in candidates(study, cfg.top_k) for i in range(cfg.seeds)]


def rerun_share(
    tuner: Tuner, study: optuna.Study, index: int, workers: int, on_done: Callable[[str], None] | None = None
) -> int:
    """Run worker ``index``'s share (every ``workers``-th of :func:`rerun_jobs`, from the ``index``-th) of the
    re-runs not yet stored, storing each value as it comes; return how many it ran."""
    cfg = tuner.study_config
    tuner.pin_threads()
    attrs = study.user_attrs
    stored = attrs.get(RERUNS_ATTR) or {}
    ran = 0
    for job in rerun_jobs(study, cfg)[index::workers]:
        if job.key in attrs or job.index < len(stored.get(str(job.trial.number), {}).get("values", [])):
            continue  # a resumed study: done before
        study.set_user_attr(job.key, job.run(tuner))
        ran += 1
        if on_done is not None:
            on_done(job.describe(cfg.seeds))
    return ran


def rerun(tuner: Tuner, study: optuna.Study, on_done: Callable[[str], None] | None = None) -> list[Candidate]:
    """Gather the candidates' values over the ``study.seeds`` seeds of :func:`rerun_seeds` (those the workers
    stored, running what is missing here), store the table (values, seeds, each plan's amount of dropout) on
    the study; best mean first. A resumed study re-runs only what is missing."""
    cfg = tuner.study_config
    tuner.pin_threads()
    attrs = study.user_attrs
    stored: dict[str, Any] = dict(attrs.get(RERUNS_ATTR, {}))
    seeds = rerun_seeds(cfg)
    for trial in candidates(study, cfg.top_k):
        key = str(trial.number)
        info = dict(stored.get(key, {}))
        values = list(info.get("values", []))
        if "amount" not in info:
            as_written = trial.user_attrs.get(BASELINE_ATTR) == BASELINE_AS_WRITTEN
            info["amount"] = (
                own_dropout(tuner.cli.fresh().model) if as_written else plan_amount(stored_plan(trial))
            )
        for i in range(len(values), cfg.seeds):
            job = RerunJob(trial, i, seeds[i])
            ran = job.key not in attrs
            values.append(float(attrs[job.key]) if not ran else job.run(tuner))
            info.update(label=trial_label(trial), values=values, seeds=seeds[: len(values)])
            stored[key] = info
            study.set_user_attr(RERUNS_ATTR, stored)
            if ran and on_done is not None:
                on_done(job.describe(cfg.seeds))
    return rerun_candidates(study)
