"""Multi-device trials: `strategy: ddp` with 2 CPU processes (gloo) gives one Optuna trial per study trial."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from studies import BASE, load, tune, write_config

from lightning_dropout import DropoutPlan

# the tiny study on 2 CPU processes, one group over both hidden layers
DDP = {"devices": 2, "strategy": "ddp", "max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 2}
GROUP = {**BASE["dropout"]["groups"][0], "per_layer": False}


def _run(tmp_path: Path, data_dir: Path, **study: object) -> optuna.Study:
    settings = {"name": "ddp", "metric": "val_loss", "direction": "minimize", "n_trials": 2, **study}
    config = write_config(tmp_path, trainer=DDP, dropout={"groups": [GROUP]}, study=settings)
    assert tune(config, tmp_path, data_dir) == 0
    return load(tmp_path, "ddp")


@pytest.mark.slow
def test_ddp_trials_are_one_optuna_trial_for_all_ranks_and_pruning_reaches_every_rank(tmp_path, data_dir):
    # val_loss of this model is far above 0.01, so the pruner stops every trial after its first validation
    # (of 2 epochs). Rank 1 learns it by broadcast: without that it would wait forever in the next collective.
    study = _run(
        tmp_path,
        data_dir,
        pruner={"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"upper": 0.01}},
        warm_start=False,
    )
    trials = study.get_trials()
    # 2 study trials = 2 Optuna trials (not one per rank), the baseline first; the baseline is never pruned
    assert len(trials) == 2
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert sorted(trials[0].intermediate_values) == [0, 1]
    assert trials[0].user_attrs["baseline"] == "no dropout" and trials[0].params == {}
    sampled = trials[1]
    assert set(sampled.params) == {"hidden/variant", f"hidden/{sampled.params['hidden/variant']}/p"}
    # rank 0 reported the metric after the first validation, then every rank stopped
    assert sorted(sampled.intermediate_values) == [0]
    # the plan rank 0 sampled (and broadcast to rank 1) is stored on the trial
    plan = DropoutPlan.from_yaml(sampled.user_attrs["plan"])
    assert {s.key for s in plan} == {"linear1:output", "linear2:output"}
    assert plan.sites[0].variant == sampled.params["hidden/variant"]
