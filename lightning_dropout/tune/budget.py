"""A study's training compute, counted in trainings of the model, and the plan that fits a study into
``study.budget`` (the Optuna layer).

One *training* is one run of ``trainer.max_epochs`` epochs. A study's compute is the epochs every trial ran (a
pruned or failed one by the epochs it ran, a running one by what it may still run) plus one training per re-run,
divided by ``max_epochs``. Everything is read from the storage, so every worker, every machine and a resumed run
count the same compute.

The plan (:class:`BudgetPlan`): the references of the comparison (the baselines and the best grid point) and
the best ``top_k`` trials race over fresh seeds (:func:`~lightning_dropout.tune.selection.race`); up to
``RACE_SHARE`` of the budget is kept for that race, in whole rounds. The trials (the baselines, a warm-start grid
cut to the budget, then sampled plans, pruned as usual) use the rest: a worker starts a trial only while a whole
training still fits beside what the running trials may use and the race's share. The race then runs its rounds
while a whole round fits in what is left.

Example:
    >>> plan = BudgetPlan.make(budget=10, max_epochs=80, references=2, top_k=3, max_seeds=10)
    >>> plan.top_k, plan.rounds, plan.reserve
    (1, 1, 3.0)
    >>> BudgetPlan.make(budget=30, max_epochs=80, references=2, top_k=3, max_seeds=10).reserve
    15.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from lightning_dropout.tune.records import (
    EPOCHS_ATTR,
    RERUN_VALUE_PREFIX,
    RERUNS_ATTR,
    SEGMENT_EPOCHS_ATTR,
    counts,
)

__all__ = [
    "MIN_RACE_SEEDS",
    "RACE_SHARE",
    "BudgetPlan",
    "compute_used",
    "grid_points",
    "grid_size",
    "rerun_runs",
    "trial_epochs",
]

RACE_SHARE = 0.5  # the most of the budget kept for the race over seeds
MIN_RACE_SEEDS = (
    3  # the seeds the race plans for before it may drop a candidate (and a 95 % interval is useful)
)


def trial_epochs(trial: optuna.trial.FrozenTrial) -> float:
    """The epochs a trial trained: as it recorded them, else its last reported epoch + 1 (0 if none)."""
    if EPOCHS_ATTR in trial.user_attrs:
        return float(trial.user_attrs[EPOCHS_ATTR])
    segment = trial.user_attrs.get(SEGMENT_EPOCHS_ATTR)  # population-based training: [start, end) epochs
    if segment is not None:
        steps = trial.intermediate_values
        if trial.state == TrialState.COMPLETE:
            return float(segment[1] - segment[0])
        return float(max(steps) + 1 - segment[0]) if steps else 0.0
    steps = trial.intermediate_values
    return float(max(steps) + 1) if steps else 0.0


def rerun_runs(study: optuna.Study) -> int:
    """The re-runs over seeds stored on the study (each one training): one value per run."""
    attrs = study.user_attrs
    keys = {k for k in attrs if k.startswith(RERUN_VALUE_PREFIX)}
    runs = len(keys)
    for number, info in (attrs.get(RERUNS_ATTR) or {}).items():  # values gathered before keys existed
        runs += sum(
            f"{RERUN_VALUE_PREFIX}{number}:{i}" not in keys for i in range(len(info.get("values", [])))
        )
    return runs


def compute_used(study: optuna.Study, max_epochs: int, running_in_full: bool = False) -> float:
    """The study's compute so far, in trainings of ``max_epochs`` epochs: every trial by its epochs, every re-run
    as one training. With ``running_in_full`` a running trial counts as a whole training (what it may use)."""
    epochs = 0.0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.WAITING:
            continue
        if trial.state == TrialState.RUNNING and running_in_full:
            epochs += max_epochs
        else:
            epochs += min(trial_epochs(trial), max_epochs)
    return epochs / max_epochs + rerun_runs(study)


def grid_points(rates: Sequence[float], n: int) -> list[float]:
    """``n`` of the warm-start ``rates`` spread over the list (all of them when ``n >= len(rates)``).

    Example:
        >>> grid_points([0.1, 0.2, 0.3, 0.5], 1), grid_points([0.1, 0.2, 0.3, 0.5], 2)
        ([0.2], [0.1, 0.3])
    """
    if n >= len(rates):
        return list(rates)
    return [rates[int((i + 0.5) * len(rates) / n - 0.5 + 1e-9)] for i in range(max(n, 0))]


def grid_size(budget: float, rates: int) -> int:
    """How many of the ``rates`` warm-start points a budget runs: one per 5 trainings, at least one."""
    return max(1, min(rates, int(budget // 5)))


@dataclass(frozen=True)
class BudgetPlan:
    """How a study fits ``budget`` trainings.

    Attributes:
        budget: the study's compute, in trainings.
        max_epochs: the epochs of one training.
        top_k: the best sampled trials that race beside the references.
        rounds: the race's planned rounds (seeds), all candidates running in each.
        reserve: the trainings kept for the race (``rounds * (references + top_k)``; 0 when not even one round
            fits in ``RACE_SHARE`` of the budget: the winner is then the best trial).
        max_seeds: the most rounds the race may run when the trials leave more than the reserve.
    """

    budget: float
    max_epochs: int
    top_k: int
    rounds: int
    reserve: float
    max_seeds: int

    @classmethod
    def make(cls, budget: float, max_epochs: int, references: int, top_k: int, max_seeds: int) -> BudgetPlan:
        """The plan for ``references`` (baselines and the best grid point) and at most ``top_k`` sampled trials
        racing over at most ``max_seeds`` seeds."""
        share = RACE_SHARE * budget
        if max_seeds < 2 or top_k < 1:
            return cls(budget, max_epochs, top_k, 0, 0.0, max_seeds)
        k = top_k
        while k > 1 and (references + k) * min(MIN_RACE_SEEDS, max_seeds) > share:
            k -= 1
        rounds = min(int(share // (references + k)), max_seeds)
        return cls(budget, max_epochs, k, rounds, float(rounds * (references + k)), max_seeds)

    def used(self, study: optuna.Study) -> float:
        """The compute the study has used, in trainings (:func:`compute_used`)."""
        return compute_used(study, self.max_epochs)

    @staticmethod
    def stalled(study: optuna.Study, last: int = 5) -> bool:
        """Whether the last ``last`` finished trials all failed before training one epoch: a budget counts
        compute, and such trials use none, so without this a study whose every trial fails would never end."""
        finished = [t for t in study.get_trials(deepcopy=False) if counts(t)]
        tail = finished[-last:]
        return len(tail) == last and all(t.state == TrialState.FAIL and trial_epochs(t) == 0 for t in tail)

    def room_for_trial(self, study: optuna.Study) -> bool:
        """Whether one more whole training fits beside what is used, what the running trials may still use and
        the race's reserve (what a worker asks before it starts a trial, after :meth:`stalled`)."""
        committed = compute_used(study, self.max_epochs, running_in_full=True)
        return committed + 1.0 + self.reserve <= self.budget + 1e-9

    def race_affordable(self, study: optuna.Study) -> Callable[[int, int], bool]:
        """``affordable(runs_so_far, runs_of_next_round)`` for the race: whether the round fits in what the
        trials left (the trials are all finished when the race runs)."""
        trials = compute_used(study, self.max_epochs) - rerun_runs(study)
        return lambda spent, runs: trials + spent + runs <= self.budget + 1e-9

    def describe(self, used: float) -> str:
        """``used 9.6 of 10 trainings``."""
        return f"used {used:.1f} of {self.budget:g} trainings"
