"""Re-running a study's candidates over fresh seeds, the same seeds for every candidate (a paired comparison
with common random numbers), and storing the values on the study for :mod:`~lightning_dropout.tune.selection`
to choose the winner from.

The runs are independent, so the study's workers share them: each claims the next run of one fixed list
(:func:`rerun_jobs`, :class:`Claims`) until none is left, the baselines' runs first, which a worker may claim as
soon as its own trials are done. Each run's value is stored under its own study attribute; :func:`rerun`
gathers them, runs whatever is still missing (a worker died) and stores the table."""

from __future__ import annotations

import math
import multiprocessing
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

__all__ = [
    "Claims",
    "RerunJob",
    "baseline_jobs",
    "rerun",
    "rerun_jobs",
    "rerun_seeds",
    "run_claimed",
    "run_claimed_baselines",
]


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
    """Every re-run of the finished study, done or not, in a fixed order: the baselines' first, then the other
    candidates' (candidate, then seed). The same list in every worker that reads the study, whatever the others
    have run meanwhile."""
    chosen = candidates(study, cfg.top_k)
    first = [t for t in chosen if BASELINE_ATTR in t.user_attrs]
    return _jobs([*first, *(t for t in chosen if BASELINE_ATTR not in t.user_attrs)], cfg)


def baseline_jobs(study: optuna.Study, cfg: StudyConfig) -> list[RerunJob] | None:
    """The head of :func:`rerun_jobs`'s list, the baselines' re-runs: known once every baseline trial has
    finished, before the other trials have (``None`` until then)."""
    if any(
        not t.state.is_finished() for t in study.get_trials(deepcopy=False) if BASELINE_ATTR in t.user_attrs
    ):
        return None
    return _jobs([t for t in candidates(study, cfg.top_k) if BASELINE_ATTR in t.user_attrs], cfg)


def _jobs(trials: list[optuna.trial.FrozenTrial], cfg: StudyConfig) -> list[RerunJob]:
    seeds = rerun_seeds(cfg)
    return [RerunJob(trial, i, seeds[i]) for trial in trials for i in range(cfg.seeds)]


class Claims:
    """Hands out the positions of :func:`rerun_jobs`'s list one at a time to the workers of one ``tune`` run,
    through a counter they share (a ``multiprocessing`` ``Value`` with its lock; a fresh one by default)."""

    def __init__(self, counter: Any = None) -> None:
        self.counter = counter if counter is not None else multiprocessing.Value("i", 0)

    def next_below(self, limit: int) -> int | None:
        """The next unclaimed position, if it is below ``limit`` (claimed); ``None`` otherwise."""
        with self.counter.get_lock():
            position = int(self.counter.value)
            if position >= limit:
                return None
            self.counter.value = position + 1
            return position


def run_claimed(
    tuner: Tuner,
    study: optuna.Study,
    jobs: list[RerunJob],
    claims: Claims,
    on_done: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Claim positions of ``jobs`` and run them until none is left (or ``stop()`` says so before a claim), storing
    each value under its own study attribute as it comes; return how many ran. A run stored before (a resumed
    study) is not run again."""
    cfg = tuner.study_config
    tuner.pin_threads()
    ran = 0
    while not (stop is not None and stop()):
        position = claims.next_below(len(jobs))
        if position is None:
            break
        job = jobs[position]
        attrs = study.user_attrs
        done = (attrs.get(RERUNS_ATTR) or {}).get(str(job.trial.number), {}).get("values", [])
        if job.key in attrs or job.index < len(done):
            continue
        study.set_user_attr(job.key, job.run(tuner))
        ran += 1
        if on_done is not None:
            on_done(job.describe(cfg.seeds))
    return ran


def run_claimed_baselines(tuner: Tuner, study: optuna.Study, claims: Claims, stop: Callable[[], bool]) -> int:
    """:func:`run_claimed` over the baselines' re-runs, if every baseline trial has finished (see
    :func:`baseline_jobs`): what a worker out of trials runs while the others finish theirs."""
    jobs = baseline_jobs(study, tuner.study_config)
    return run_claimed(tuner, study, jobs, claims, stop=stop) if jobs else 0


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
            ran = job.key not in attrs  # else a worker ran it: gathered
            values.append(job.run(tuner) if ran else float(attrs[job.key]))
            if ran or i == cfg.seeds - 1:  # a value run here is kept as it comes; gathered ones at the end
                info.update(label=trial_label(trial), values=values, seeds=seeds[: len(values)])
                stored[key] = info
                study.set_user_attr(RERUNS_ATTR, stored)
            if ran and on_done is not None:
                on_done(job.describe(cfg.seeds))
    return rerun_candidates(study)
