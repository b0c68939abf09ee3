"""Defect 1 of the reliability issue: a resumed or joined study must not replay the sampler's random draws.

The sampler is seeded per trial number (``lightning_dropout.tune.seeding``): a fresh study is reproducible,
and every later invocation or joining process proposes new parameters.
"""

from __future__ import annotations

import json

import optuna
import pytest
from studies import load, tune, write_config

from lightning_dropout.tune.records import BASELINE_ATTR
from lightning_dropout.tune.seeding import PerTrialSeeded, derive_seed, seeded_sampler

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

TPE = {"class_path": "optuna.samplers.TPESampler", "init_args": {"multivariate": True, "group": True}}


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -1, 1) ** 2 + trial.suggest_float("y", 0, 1)


def _open(storage: str, spec: dict = TPE, seed: int = 0) -> optuna.Study:
    return optuna.create_study(
        study_name="s", storage=storage, sampler=seeded_sampler(spec, seed), load_if_exists=True
    )


def _params(study: optuna.Study) -> list[str]:
    return [json.dumps(t.params, sort_keys=True) for t in study.get_trials() if t.params]


def test_a_resumed_study_proposes_new_parameters(tmp_path):
    storage = f"sqlite:///{tmp_path / 'a.db'}"
    _open(storage).optimize(_objective, n_trials=3)
    _open(storage).optimize(_objective, n_trials=3)  # a second invocation: a fresh sampler object
    params = _params(optuna.load_study(study_name="s", storage=storage))
    assert len(params) == 6 and len(set(params)) == 6, params


def test_two_processes_joining_one_study_propose_different_parameters(tmp_path):
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    first, second = _open(storage), _open(storage)  # same seed, as two machines with one config
    for _ in range(3):
        first.optimize(_objective, n_trials=1)
        second.optimize(_objective, n_trials=1)
    params = _params(first)
    assert len(params) == 6 and len(set(params)) == 6, params


def test_a_fresh_study_is_reproducible_and_the_seed_matters(tmp_path):
    runs = []
    for name, seed in (("c1", 0), ("c2", 0), ("c3", 1)):
        study = _open(f"sqlite:///{tmp_path / name}.db", seed=seed)
        study.optimize(_objective, n_trials=4)
        runs.append(_params(study))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_a_seed_in_the_sampler_args_is_the_base_and_qmc_keeps_one_seed():
    sampler = seeded_sampler({"class_path": "optuna.samplers.RandomSampler", "init_args": {"seed": 7}}, 0)
    assert isinstance(sampler, PerTrialSeeded) and sampler._seed == 7
    assert derive_seed(7, 0) != derive_seed(7, 1) and derive_seed(7, 1) != derive_seed(8, 1)
    qmc = seeded_sampler({"class_path": "optuna.samplers.QMCSampler", "init_args": {}}, 3)
    assert isinstance(qmc, optuna.samplers.QMCSampler)


def test_tune_twice_never_repeats_a_sampled_trial(tmp_path, data_dir):
    """`tune --n_trials 3` then `tune --n_trials 5`: the later trials are new proposals, not a replay."""
    config = write_config(tmp_path, study={"n_trials": 3})
    assert tune(config, tmp_path, data_dir) == 0
    assert tune(config, tmp_path, data_dir, "--n_trials", "5") == 0
    trials = load(tmp_path).get_trials()
    sampled = [json.dumps(t.params, sort_keys=True) for t in trials if BASELINE_ATTR not in t.user_attrs]
    assert len(sampled) == 4 and len(set(sampled)) == 4, sampled
