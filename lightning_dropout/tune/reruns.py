"""Re-running a study's candidates over fresh seeds, the same seeds for every candidate (a paired comparison
with common random numbers), as a race, and storing the values on the study for
:mod:`~lightning_dropout.tune.selection` to choose the winner from.

The race (:func:`~lightning_dropout.tune.selection.race`) gives every candidate still in it one more seed per
round and drops those a paired test finds worse than the leader; the references (the baselines, the best grid
point) stay to the end, and with ``study.budget`` a round runs only when it fits. The race is replayed from the
values stored so far, so every worker, machine and resumed run sees the same rounds.

The runs of a round are independent, so the study's workers share them: each claims the next run of the race's
list (every round's runs, round after round: :func:`rerun_jobs`, :class:`Claims`) and, at the end of a round,
waits for the round's other runs before the next round is known. The baselines' runs may start as soon as a
worker's own trials are done (:func:`baseline_jobs`, with their own counter), except under a budget, which only
the race may spend. Each run's value is stored under its own study attribute; :func:`rerun` gathers them, runs
whatever is still missing (a worker died) and stores the table."""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from lightning_dropout.tune.budget import MIN_RACE_SEEDS, BudgetPlan
from lightning_dropout.tune.config import StudyConfig
from lightning_dropout.tune.fixed import own_dropout
from lightning_dropout.tune.records import (
    BASELINE_AS_WRITTEN,
    BASELINE_ATTR,
    RERUN_VALUE_PREFIX,
    RERUNS_ATTR,
    SEARCH_ATTR,
    WARM_START_ATTR,
    candidates,
    plan_amount,
    rerun_candidates,
    stored_plan,
    trial_label,
)
from lightning_dropout.tune.selection import Candidate, Race, race

if TYPE_CHECKING:
    from lightning_dropout.tune.runner import Tuner

__all__ = [
    "Claims",
    "RerunJob",
    "baseline_jobs",
    "race_state",
    "rerun",
    "rerun_jobs",
    "rerun_seeds",
    "run_claimed",
    "run_claimed_baselines",
    "run_race",
]


def rerun_seeds(cfg: StudyConfig) -> list[int]:
    """The re-run seeds, the same for every candidate (paired comparison, common random numbers)."""
    return [cfg.seed + 1000 * (i + 1) for i in range(cfg.seeds or 0)]


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
        return f"{trial_label(self.trial)} seed {self.index + 1} (of at most {seeds})"


def _stored_values(study: optuna.Study, numbers: list[int]) -> dict[int, list[float]]:
    """Each candidate's re-run values stored so far, seed by seed (the per-run attributes, else the table)."""
    attrs = study.user_attrs
    table = attrs.get(RERUNS_ATTR) or {}
    out: dict[int, list[float]] = {}
    for number in numbers:
        values: list[float] = []
        while f"{RERUN_VALUE_PREFIX}{number}:{len(values)}" in attrs:
            values.append(float(attrs[f"{RERUN_VALUE_PREFIX}{number}:{len(values)}"]))
        old = [float(v) for v in (table.get(str(number)) or {}).get("values", [])]
        out[number] = old if len(old) > len(values) else values
    return out


def race_state(
    study: optuna.Study, cfg: StudyConfig, budget: BudgetPlan | None = None
) -> tuple[list[optuna.trial.FrozenTrial], Race, dict[int, list[float]]]:
    """The candidates (the best ``top_k`` trials, or as many as the ``budget`` fits, the best grid point and the
    baselines), the race replayed from the values stored so far, and those values."""
    chosen = candidates(study, budget.top_k if budget is not None else int(cfg.top_k or 0))
    numbers = [t.number for t in chosen]
    protected = [t.number for t in chosen if BASELINE_ATTR in t.user_attrs or WARM_START_ATTR in t.user_attrs]
    values = _stored_values(study, numbers)
    seeds = int(cfg.seeds or 0)
    state = race(
        values,
        numbers,
        protected,
        rounds=seeds if seeds > 1 else 0,
        maximize=study.direction == optuna.study.StudyDirection.MAXIMIZE,
        alpha=cfg.race_alpha,
        min_seeds=max(2, min(MIN_RACE_SEEDS, seeds)),
        affordable=budget.race_affordable(study) if budget is not None else None,
    )
    return chosen, state, values


def rerun_jobs(
    study: optuna.Study, cfg: StudyConfig, budget: BudgetPlan | None = None
) -> tuple[list[RerunJob], Race]:
    """Every run of the race so far, done or not, round after round (each round's candidates in a fixed order:
    the sampled ones, the best grid point, the baselines), and the race. The same list in every process that
    reads the same stored values."""
    chosen, state, _ = race_state(study, cfg, budget)
    by_number = {t.number: t for t in chosen}
    seeds = rerun_seeds(cfg)
    jobs = [RerunJob(by_number[c], r, seeds[r]) for r, round_ in enumerate(state.rounds) for c in round_]
    return jobs, state


def baseline_jobs(study: optuna.Study, cfg: StudyConfig) -> list[RerunJob] | None:
    """The baselines' re-runs over every seed, known once every baseline trial has finished, before the other
    trials have (``None`` until then). The race never drops a baseline, so without a budget they run them all;
    a worker out of trials may start them early."""
    if cfg.budget is not None:
        return []  # the race decides how many seeds the budget affords
    if any(
        not t.state.is_finished() for t in study.get_trials(deepcopy=False) if BASELINE_ATTR in t.user_attrs
    ):
        return None
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    seeds = rerun_seeds(cfg)
    return [
        RerunJob(t, i, seeds[i])
        for t in done
        if BASELINE_ATTR in t.user_attrs and t.value is not None
        for i in range(len(seeds) if len(seeds) > 1 else 0)
    ]


class Claims:
    """Hands out the positions of a list of runs one at a time to the workers of one ``tune`` run, through a
    counter they share (a ``multiprocessing`` ``Value`` with its lock; a fresh one by default)."""

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


def _stored(study: optuna.Study, job: RerunJob) -> bool:
    attrs = study.user_attrs
    done = (attrs.get(RERUNS_ATTR) or {}).get(str(job.trial.number), {}).get("values", [])
    return job.key in attrs or job.index < len(done)


def _run(tuner: Tuner, study: optuna.Study, job: RerunJob, on_done: Callable[[str], None] | None) -> None:
    study.set_user_attr(job.key, job.run(tuner))
    if on_done is not None:
        on_done(job.describe(int(tuner.study_config.seeds or 0)))


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
    tuner.pin_threads()
    ran = 0
    while not (stop is not None and stop()):
        position = claims.next_below(len(jobs))
        if position is None:
            break
        job = jobs[position]
        if _stored(study, job):
            continue
        _run(tuner, study, job, on_done)
        ran += 1
    return ran


def run_claimed_baselines(tuner: Tuner, study: optuna.Study, claims: Claims, stop: Callable[[], bool]) -> int:
    """:func:`run_claimed` over the baselines' re-runs, if every baseline trial has finished (see
    :func:`baseline_jobs`): what a worker out of trials runs while the others finish theirs."""
    jobs = baseline_jobs(study, tuner.study_config)
    return run_claimed(tuner, study, jobs, claims, stop=stop) if jobs else 0


def run_race(
    tuner: Tuner,
    study: optuna.Study,
    claims: Claims,
    on_done: Callable[[str], None] | None = None,
    rescue: Callable[[], bool] = lambda: True,
    stop: Callable[[], bool] | None = None,
    poll: float = 0.5,
) -> int:
    """Run this process's share of the race: claim runs of the current round until none is left, wait for the
    round's other runs (running them here when ``rescue()`` says their worker is gone), then go on with the
    next round, until the race is finished (or ``stop()``); return how many ran here."""
    ran = 0
    while True:
        jobs, state = rerun_jobs(study, tuner.study_config, tuner.budget)
        ran += run_claimed(tuner, study, jobs, claims, on_done, stop)
        if state.finished or (stop is not None and stop()):
            return ran
        missing = [j for j in jobs if not _stored(study, j)]
        while missing:  # the round's runs other workers claimed
            if stop is not None and stop():
                return ran
            if rescue():
                for job in missing:
                    _run(tuner, study, job, on_done)
                    ran += 1
            else:
                time.sleep(poll)
            missing = [j for j in missing if not _stored(study, j)]


def rerun(tuner: Tuner, study: optuna.Study, on_done: Callable[[str], None] | None = None) -> list[Candidate]:
    """Finish the race here (running whatever no worker ran), store the table (each candidate's values, seeds,
    amount of dropout and, when the race dropped it, after how many seeds) on the study; best mean first. A
    resumed study runs only what is missing."""
    cfg = tuner.study_config
    tuner.pin_threads()
    run_race(tuner, study, Claims(), on_done)
    chosen, state, values = race_state(study, cfg, tuner.budget)
    seeds = rerun_seeds(cfg)
    stored: dict[str, Any] = dict(study.user_attrs.get(RERUNS_ATTR, {}))
    for trial in chosen:
        info = dict(stored.get(str(trial.number), {}))
        if "amount" not in info:
            as_written = trial.user_attrs.get(BASELINE_ATTR) == BASELINE_AS_WRITTEN
            info["amount"] = (
                own_dropout(tuner.cli.fresh().model) if as_written else plan_amount(stored_plan(trial))
            )
        runs = values[trial.number]
        info.update(label=trial_label(trial), values=runs, seeds=seeds[: len(runs)])
        if trial.number in state.dropped:
            info["dropped_after"] = state.dropped[trial.number]
        if runs:
            stored[str(trial.number)] = info
    if stored != study.user_attrs.get(RERUNS_ATTR):
        study.set_user_attr(RERUNS_ATTR, stored)
    return rerun_candidates(study)
