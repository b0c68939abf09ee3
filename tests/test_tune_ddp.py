"""Multi-device trials: `strategy: ddp` with 2 CPU processes (gloo) gives one Optuna trial per study trial."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lightning_dropout import DropoutPlan
from lightning_dropout.cli import main

CONFIG = {
    "model": {"class_path": "lightning_dropout.zoo.MLP"},
    "data": {"class_path": "lightning_dropout.data.MNIST1DDataModule", "init_args": {"batch_size": 100}},
    "trainer": {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": "ddp",
        "max_epochs": 2,
        "limit_train_batches": 3,
        "limit_val_batches": 2,
        "enable_checkpointing": False,
    },
    "dropout": {
        "groups": [
            {
                "name": "hidden",
                "select": {"match": "Linear"},
                "variants": ["standard", "gaussian"],
                "p": [0.05, 0.5],
            }
        ]
    },
    "study": {
        "name": "ddp",
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 2,
        "seeds": 0,
        "pruner": None,
    },
}


def _run(tmp_path: Path, **study: object) -> optuna.Study:
    config = {**CONFIG, "study": {**CONFIG["study"], **study, "run_dir": str(tmp_path / "runs")}}
    config["data"]["init_args"]["cache_dir"] = str(tmp_path / "data")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["tune", str(path)]) == 0
    return optuna.load_study(
        study_name=config["study"]["name"],
        storage=f"sqlite:///{tmp_path / 'runs' / config['study']['name'] / 'study.db'}",
    )


@pytest.mark.slow
def test_ddp_trials_are_one_optuna_trial_for_all_ranks_and_pruning_reaches_every_rank(tmp_path):
    # val_loss of this model is far above 0.01, so the pruner stops every trial after its first validation
    # (of 2 epochs). Rank 1 learns it by broadcast: without that it would wait forever in the next collective.
    study = _run(
        tmp_path,
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
