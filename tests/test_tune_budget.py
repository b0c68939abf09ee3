"""study.budget (the study's compute in trainings) and the race over seeds."""

from __future__ import annotations

import math
import random

import optuna
import pytest
from lightning.pytorch.callbacks import Callback
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from studies import load, tune, write_config

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.tune import StudyConfig
from lightning_dropout.tune.budget import BudgetPlan, compute_used, grid_points, trial_epochs
from lightning_dropout.tune.selection import Candidate, choose_winner, race, t_quantile, t_upper


# ----------------------------------------------------------------------------------------------------------
# the race (pure)
# ----------------------------------------------------------------------------------------------------------
def _noisy(mean: float, n: int, rng: random.Random, sd: float = 0.005) -> list[float]:
    return [mean + rng.gauss(0, sd) for _ in range(n)]


def test_the_race_drops_a_candidate_whose_paired_interval_excludes_it_and_keeps_the_references():
    rng = random.Random(0)
    values = {
        7: _noisy(0.70, 6, rng),  # the leader
        8: _noisy(0.60, 6, rng),  # clearly worse: dropped
        9: _noisy(0.699, 6, rng),  # as good as the leader within the noise: stays
        0: _noisy(0.50, 6, rng),  # no dropout: worse still, but a reference
        3: _noisy(0.55, 6, rng),  # the best grid point: a reference
    }
    state = race(values, [7, 8, 9, 3, 0], protected=[0, 3], rounds=6, maximize=True)
    assert state.dropped == {8: 3}  # at the first look (3 paired seeds)
    assert state.finished and set(state.alive) == {7, 9, 3, 0}
    assert [len(r) for r in state.rounds] == [5, 5, 5, 4, 4, 4]  # no more seeds for the dropped one
    # the same candidate is not dropped before 3 seeds, nor with alpha = 0
    assert race(values, [7, 8], protected=[], rounds=2, maximize=True).dropped == {}
    assert race(values, [7, 8, 9], protected=[], rounds=6, maximize=True, alpha=0).dropped == {}
    # minimizing: the same race on negated values
    negated = {c: [-v for v in vs] for c, vs in values.items()}
    assert race(negated, [7, 8, 9, 3, 0], [0, 3], rounds=6, maximize=False).dropped == {8: 3}


def test_the_race_waits_for_a_rounds_values_and_stops_where_the_budget_ends():
    values = {1: [0.7], 2: [0.6, 0.6], 0: []}
    state = race(values, [1, 2, 0], protected=[0], rounds=5, maximize=True)
    assert not state.finished and state.pending(values) == [(0, 0)]  # round 0 still needs candidate 0
    # a round runs whole or not at all: 3 runs a round, 7 runs afforded -> 2 rounds
    full = {c: [0.5] * 5 for c in (0, 1, 2)}
    state = race(
        full, [1, 2, 0], [0], rounds=5, maximize=True, affordable=lambda spent, runs: spent + runs <= 7
    )
    assert state.finished and len(state.rounds) == 2


def test_the_race_drops_a_candidate_as_good_as_the_others_at_most_alpha_of_the_time():
    """The race's error rate: with every candidate equal, any drop is a false one. Over 400 races of 4
    candidates and 8 rounds at alpha = 0.05, candidate 1 is dropped in at most 5 % of them (the guarantee is
    per candidate: the best one is lost at most alpha of the time)."""
    rng = random.Random(1)
    drops = 0
    for _ in range(400):
        values = {c: _noisy(0.6, 8, rng, sd=0.02) for c in range(4)}
        drops += 1 in race(values, [0, 1, 2, 3], protected=[0], rounds=8, maximize=True).dropped
    assert drops <= 0.05 * 400


def test_t_upper_matches_the_table_of_t_quantiles():
    for df in (1, 2, 3, 4, 5, 8, 10, 20):
        assert t_upper(0.025, df) == pytest.approx(t_quantile(df), abs=2e-3)
    assert t_upper(0.05 / 12, 4) > t_upper(0.05, 4)
    with pytest.raises(ValueError, match="level"):
        t_upper(0.7, 3)


def test_a_dropped_candidate_cannot_win():
    lucky = Candidate("trial 5", 5, None, [0.9, 0.9, 0.9], amount=0.0, dropped_after=3)  # type: ignore[arg-type]
    leader = Candidate("trial 6", 6, None, [0.8, 0.8, 0.8, 0.8], amount=1.0)  # type: ignore[arg-type]
    assert choose_winner([lucky, leader], maximize=True).label == "trial 6"


# ----------------------------------------------------------------------------------------------------------
# the plan and the accounting
# ----------------------------------------------------------------------------------------------------------
def test_the_budget_plan_keeps_whole_race_rounds_within_its_share():
    small = BudgetPlan.make(5, 80, references=2, top_k=3, max_seeds=10)
    assert (small.top_k, small.rounds, small.reserve) == (1, 0, 0.0)  # not one round fits: no race
    ten = BudgetPlan.make(10, 80, references=2, top_k=3, max_seeds=10)
    assert (ten.top_k, ten.rounds, ten.reserve) == (1, 1, 3.0)
    twenty = BudgetPlan.make(20, 80, references=2, top_k=3, max_seeds=10)
    assert (twenty.top_k, twenty.rounds, twenty.reserve) == (1, 3, 9.0)
    thirty = BudgetPlan.make(30, 80, references=2, top_k=3, max_seeds=10)
    assert (thirty.top_k, thirty.rounds, thirty.reserve) == (3, 3, 15.0)
    assert grid_points([0.1, 0.2, 0.3, 0.5], 1) == [0.2] and grid_points([0.1, 0.2], 5) == [0.1, 0.2]


def _trial(state: TrialState, epochs: int, **attrs: float) -> optuna.trial.FrozenTrial:
    return create_trial(
        state=state,
        value=0.5 if state == TrialState.COMPLETE else None,
        params={"p": 0.1},
        distributions={"p": FloatDistribution(0, 1)},
        intermediate_values={e: 0.5 for e in range(epochs)},
        user_attrs=dict(attrs),
    )


def test_compute_counts_every_trial_by_its_epochs_and_every_rerun_as_one_training():
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(TrialState.COMPLETE, 10))
    study.add_trial(_trial(TrialState.PRUNED, 3))  # pruned after 3 epochs
    study.add_trial(_trial(TrialState.FAIL, 2))  # failed in its third epoch, nothing reported then
    study.add_trial(_trial(TrialState.COMPLETE, 10, epochs_trained=7))  # stopped early by the user's callback
    assert trial_epochs(study.trials[3]) == 7
    study.set_user_attr("rerun_value:0:0", 0.5)
    study.set_user_attr("rerun_value:0:1", math.nan)  # a failed re-run still trained
    assert compute_used(study, 10) == pytest.approx((10 + 3 + 2 + 7) / 10 + 2)


def test_a_budget_needs_max_epochs_and_at_least_one_training(tmp_path, data_dir, capsys):
    with pytest.raises(DropoutConfigError, match=r"study\.budget"):
        StudyConfig(budget=0.5)
    config = write_config(tmp_path, trainer={"max_epochs": None, "max_steps": 6}, study={"budget": 3})
    assert tune(config, tmp_path, data_dir) == 2
    assert "trainer.max_epochs" in capsys.readouterr().err


def test_without_any_size_a_study_gets_the_default_budget_and_with_them_none():
    assert StudyConfig().budget == 10 and StudyConfig().n_trials is None
    legacy = StudyConfig(n_trials=7)
    assert legacy.budget is None and (legacy.top_k, legacy.seeds) == (3, 3)


# ----------------------------------------------------------------------------------------------------------
# end to end: two workers, a resume
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_budget_holds_across_two_workers_and_a_resume(tmp_path, data_dir, capsys):
    """3 trainings of 2 epochs on 2 workers, no re-runs: the trials stop within one trial of the budget; resumed
    with the same budget nothing more runs, resumed with a larger one the study goes on to it and no further."""
    sizes = {"n_trials": None, "top_k": None, "seeds": 0, "warm_start": True, "pruner": None}
    config = write_config(tmp_path, study={**sizes, "budget": 3, "workers": 2})
    assert tune(config, tmp_path, data_dir) == 0
    first = compute_used(load(tmp_path), 2)
    assert 2 <= first <= 3 + 1  # no overshoot beyond one trial's epochs
    out = capsys.readouterr().out
    assert f"compute: used {first:.1f} of 3 trainings" in out
    resumed = write_config(tmp_path, study={**sizes, "budget": 3, "workers": 1})
    assert tune(resumed, tmp_path, data_dir) == 0  # the same budget: nothing more to run
    assert compute_used(load(tmp_path), 2) == first
    config = write_config(tmp_path, study={**sizes, "budget": 5, "workers": 2})
    assert tune(config, tmp_path, data_dir) == 0
    second = compute_used(load(tmp_path), 2)
    assert 4 <= second <= 5 + 1
    assert all(
        t.user_attrs.get("epochs_trained") == 2 for t in load(tmp_path).trials if t.state.is_finished()
    )


@pytest.mark.slow
def test_a_budget_leaves_room_for_the_race_and_the_race_keeps_both_references(tmp_path, data_dir, capsys):
    sizes = {"n_trials": None, "top_k": None, "seeds": None, "warm_start": True, "budget": 8, "pruner": None}
    assert tune(write_config(tmp_path, study=sizes), tmp_path, data_dir) == 0
    study = load(tmp_path)
    used = compute_used(study, 2)
    assert used <= 8 + 1e-9
    table = study.user_attrs["reruns"]
    labels = {info["label"] for info in table.values()}
    assert {
        "no dropout",
        "uniform p=0.2",
    } <= labels  # both references race (grid of one point at 8 trainings)
    rounds = {len(info["values"]) for info in table.values()}
    assert rounds and min(rounds) >= 1
    assert f"compute: used {used:.1f} of 8 trainings" in capsys.readouterr().out


def test_the_budget_has_a_command_line_shortcut():
    from lightning_dropout.cli import _study_shortcuts

    assert _study_shortcuts(["study.yaml", "--budget", "5"]) == ["study.yaml", "--study.budget=5"]


class FailOnTrainStart(Callback):
    """Every trial fails before its first epoch (as a broken model or data would), each with its own words."""

    failures = 0

    def on_train_start(self, trainer, pl_module):
        FailOnTrainStart.failures += 1
        raise RuntimeError(f"broken before the first epoch (failure {FailOnTrainStart.failures})")


def test_a_budget_study_whose_trials_all_fail_before_training_ends(tmp_path, data_dir, capsys):
    """Failed trials that trained nothing use no compute: the study stops after 5 of them instead of looping,
    and does not succeed."""
    config = write_config(tmp_path, study={"n_trials": None, "top_k": None, "seeds": 0, "budget": 3})
    callbacks = '--trainer.callbacks=[{"class_path": "test_tune_budget.FailOnTrainStart"}]'
    assert tune(config, tmp_path, data_dir, callbacks) == 2
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 5
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-dropout:")]
    assert len(errors) == 1 and "no trial completed (5 failed of 5)" in errors[0], errors
    assert "broken before the first epoch" in errors[0]
