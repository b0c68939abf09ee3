"""Tuning studies: config validation, the search space, whole studies through `main(["tune", ...])`, faults,
pruning, re-runs over seeds, `best`, `fit --plan`, journal storage, redaction, DDP detection and common random
numbers. Every study is tiny (MLP on MNIST-1D, 2 epochs of 3 batches, 1 validation batch)."""

from __future__ import annotations

import json
import math
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import pytest
import torch
from helpers import TinyNet, loader, trainer
from optuna.trial import TrialState
from studies import error_line, load, sqlite_url, tune, write_config
from torch import nn

from lightning_dropout.callback import DropoutInjector
from lightning_dropout.cli import main
from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.injection import Rule
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.tune import SearchGroup, Tuner, open_study, redact, suggest_plan, winner
from lightning_dropout.zoo import CNN, MLP, TransformerEncoderClassifier

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

pytestmark = pytest.mark.usefixtures("one_thread")


def our_lines(text: str) -> list[str]:
    """Our own stderr lines (Lightning's and Optuna's logging may share the stream in tests)."""
    return [line for line in text.splitlines() if line.startswith("lightning-dropout:")]


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return error_line(captured.err, out=captured.out)


# ----------------------------------------------------------------------------------------------------------
# 1. Config validation: exit status 2 and one line naming what is wrong (the table of bad configs and command
#    lines is tests/test_bad_inputs.py)
# ----------------------------------------------------------------------------------------------------------
def test_typo_in_the_yaml_file_names_the_key(tmp_path, data_dir, capsys):
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("n_trials:", "n_trails:"))
    assert tune(config, tmp_path, data_dir) == 2
    line = one_error(capsys)
    assert (
        f"error: {config}: `study.n_trails` must be a known key" in line
        and "nearest: ['study.n_trials'" in line
    )


def test_typo_in_the_yaml_sampler_suggests_the_nearest(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, study={"sampler": {"class_path": "optuna.samplers.TPESamplr"}})
    assert tune(config, tmp_path, data_dir) == 2
    line = one_error(capsys)
    assert "nearest: ['optuna.samplers.TPESampler'" in line and f"error: {config}: " in line


@pytest.mark.parametrize(
    "group",
    [
        pytest.param('{"name": "hidden", "select": {"match": "Linear"}, "p": [0.6, 0.1]}', id="p-reversed"),
        pytest.param(
            '{"name": "hidden", "select": {"match": "Linear"}, "variants": ["standrd"]}', id="variant"
        ),
    ],
)
def test_bad_group_error_names_the_group(tmp_path, data_dir, capsys, group):
    other = '{"name": "other", "select": {"match": "Linear"}}'
    assert tune(write_config(tmp_path), tmp_path, data_dir, f"--dropout.groups=[{other}, {group}]") == 2
    assert "dropout.groups['hidden']" in one_error(capsys)


def test_metric_that_is_never_logged_is_named(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, study={"n_trials": 1})
    assert tune(config, tmp_path, data_dir, "--study.metric=val_accuracy") == 2
    line = one_error(capsys)
    assert "`study.metric`" in line and "val_accuracy" in line


# ----------------------------------------------------------------------------------------------------------
# 2. The search space
# ----------------------------------------------------------------------------------------------------------
def _cnn() -> CNN:
    return CNN(channels=4)


def _conv_group(**kwargs: Any) -> SearchGroup:
    args: dict[str, Any] = {
        "name": "conv",
        "select": {"match": "Conv1d"},
        "variants": ["spatial", "dropblock"],
        "p": [0.1, 0.5],
        "params": {"dropblock": {"block_size": [3, 5]}},
    }
    return SearchGroup(**{**args, **kwargs})


def test_conditional_space_fixed_trial():
    model = _cnn()
    group = _conv_group()
    trial = optuna.trial.FixedTrial(
        {"conv/variant": "dropblock", "conv/dropblock/p": 0.3, "conv/dropblock/block_size": 5}
    )
    plan = suggest_plan(trial, [group], model, model.example_input_array)
    assert [s.key for s in plan] == ["conv1:output", "conv2:output", "conv3:output"]
    assert {(s.variant, s.p, s.params["block_size"]) for s in plan} == {("dropblock", 0.3, 5)}
    assert set(trial.params) == {"conv/variant", "conv/dropblock/p", "conv/dropblock/block_size"}

    trial = optuna.trial.FixedTrial({"conv/variant": "spatial", "conv/spatial/p": 0.2})
    plan = suggest_plan(trial, [group], model, model.example_input_array)
    assert {(s.variant, s.p, dict(s.params).get("block_size")) for s in plan} == {("spatial", 0.2, None)}
    assert set(trial.params) == {"conv/variant", "conv/spatial/p"}  # no block_size without dropblock


def test_conditional_space_real_study():
    model = _cnn()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        plan = suggest_plan(trial, [_conv_group()], model, model.example_input_array)
        variant = trial.params["conv/variant"]
        seen.add(variant)
        has_block = "conv/dropblock/block_size" in trial.params
        assert has_block == (variant == "dropblock")
        assert all(s.variant == variant for s in plan)
        if has_block:
            assert {s.params["block_size"] for s in plan} == {trial.params["conv/dropblock/block_size"]}
            assert trial.params["conv/dropblock/block_size"] in (3, 5)
        study.tell(trial, 0.0)
    assert seen == {"spatial", "dropblock"}


def test_per_layer_chooses_per_site_grouped_once():
    model = MLP(hidden=8)
    per_layer = SearchGroup(
        name="hidden", select={"match": "Linear"}, variants=["standard", "gaussian"], per_layer=True
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    plan = suggest_plan(trial, [per_layer], model, model.example_input_array)
    targets = ["linear1", "linear2"]  # the output layer is excluded
    assert {k for k in trial.params if k.endswith("/variant")} == {f"hidden/{t}/variant" for t in targets}
    for site in plan:
        variant = trial.params[f"hidden/{site.target}/variant"]
        assert site.variant == variant
        assert site.p == pytest.approx(trial.params[f"hidden/{site.target}/{variant}/p"])
    assert [s.target for s in plan] == targets

    grouped = SearchGroup(name="hidden", select={"match": "Linear"}, variants=["standard", "gaussian"])
    trial = optuna.trial.FixedTrial({"hidden/variant": "gaussian", "hidden/gaussian/p": 0.25})
    plan = suggest_plan(trial, [grouped], model, model.example_input_array)
    assert set(trial.params) == {"hidden/variant", "hidden/gaussian/p"}
    assert [(s.target, s.variant, s.p) for s in plan] == [
        ("linear1", "gaussian", 0.25),
        ("linear2", "gaussian", 0.25),
    ]


def test_zero_rate_injects_nothing_but_switches_replaced_dropout_off():
    model = MLP(hidden=8)
    grouped = SearchGroup(name="hidden", select={"match": "Linear"}, p=[0.0, 0.5])
    trial = optuna.trial.FixedTrial({"hidden/variant": "standard", "hidden/standard/p": 0.0})
    assert len(suggest_plan(trial, [grouped], model, model.example_input_array)) == 0

    per_layer = SearchGroup(name="hidden", select={"match": "Linear"}, p=[0.0, 0.5], per_layer=True)
    trial = optuna.trial.FixedTrial(
        {
            "hidden/linear1/variant": "standard",
            "hidden/linear1/standard/p": 0.0,
            "hidden/linear2/variant": "standard",
            "hidden/linear2/standard/p": 0.3,
        }
    )
    plan = suggest_plan(trial, [per_layer], model, model.example_input_array)
    assert [(s.target, s.p) for s in plan] == [("linear2", 0.3)]

    transformer = TransformerEncoderClassifier()
    replace = SearchGroup(name="own", select={"replace": True}, p=[0.0, 0.3])
    trial = optuna.trial.FixedTrial({"own/variant": "standard", "own/standard/p": 0.0})
    plan = suggest_plan(trial, [replace], transformer, transformer.example_input_array)
    assert len(plan) > 0 and all(s.p == 0.0 for s in plan)


def test_fixed_rate_is_not_suggested():
    model = MLP(hidden=8)
    group = SearchGroup(name="hidden", select={"match": "Linear"}, p=[0.2, 0.2])
    trial = optuna.trial.FixedTrial({"hidden/variant": "standard"})
    plan = suggest_plan(trial, [group], model, model.example_input_array)
    assert set(trial.params) == {"hidden/variant"} and {s.p for s in plan} == {0.2}


def test_depth_scaling_choice():
    model = _cnn()
    group = SearchGroup(
        name="conv", select={"match": "Conv1d"}, variants=["standard"], depth_scaling=["none", "linear"]
    )
    trial = optuna.trial.FixedTrial(
        {"conv/variant": "standard", "conv/standard/p": 0.4, "conv/depth_scaling": "linear"}
    )
    plan = suggest_plan(trial, [group], model, model.example_input_array)
    assert [s.p for s in plan] == pytest.approx([0.0, 0.2, 0.4])
    trial = optuna.trial.FixedTrial(
        {"conv/variant": "standard", "conv/standard/p": 0.4, "conv/depth_scaling": "none"}
    )
    plan = suggest_plan(trial, [group], model, model.example_input_array)
    assert [s.p for s in plan] == pytest.approx([0.4, 0.4, 0.4])
    assert "conv/depth_scaling" in trial.params

    single = SearchGroup(name="conv", select={"match": "Conv1d"}, variants=["standard"])
    trial = optuna.trial.FixedTrial({"conv/variant": "standard", "conv/standard/p": 0.4})
    suggest_plan(trial, [single], model, model.example_input_array)
    assert "conv/depth_scaling" not in trial.params  # one choice: not a search dimension

    with pytest.raises(DropoutConfigError, match="depth_scaling"):
        SearchGroup(name="conv", depth_scaling=["quadratic"])


def test_per_layer_does_not_sample_an_unused_depth_scaling():
    model = _cnn()
    try:
        group = _conv_group(per_layer=True, depth_scaling=["none", "linear"])
    except DropoutConfigError:
        return  # rejecting the combination at load time is a fix too
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    suggest_plan(trial, [group], model, model.example_input_array)
    assert not [k for k in trial.params if k.endswith("depth_scaling")]


# ----------------------------------------------------------------------------------------------------------
# 3. A whole study, `best`, resume; 9. the printed storage
# ----------------------------------------------------------------------------------------------------------
def test_study_end_to_end_best_and_resume(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # Rich would fold the long storage URL at 80 columns
    config = write_config(tmp_path)
    assert tune(config, tmp_path, data_dir, "--study.n_trials=2") == 0
    err = capsys.readouterr().err
    url = sqlite_url(tmp_path)
    assert f" in {redact(url)}: val_acc (maximize)" in err

    study = load(tmp_path)
    trials = study.get_trials()
    assert len([t for t in trials if t.state in FINISHED]) == 2
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # pruner: null, nothing pruned
    # the baseline was enqueued first: no parameters, an empty plan
    assert trials[0].user_attrs["baseline"] == "no dropout"
    assert trials[0].params == {}
    assert len(DropoutPlan.from_yaml(trials[0].user_attrs["plan"])) == 0
    for trial in trials:
        plan = DropoutPlan.from_yaml(trial.user_attrs["plan"])
        assert trial.user_attrs["metrics"]["val_acc"] == pytest.approx(trial.intermediate_values[1])
        assert sorted(trial.intermediate_values) == [0, 1]  # reported after each epoch
        assert trial.value == pytest.approx(max(trial.intermediate_values.values()))
        if trial.number > 0:  # sampled: the stored plan is what the parameters say
            assert "baseline" not in trial.user_attrs
            assert {(s.target, s.variant) for s in plan} == {
                (t, trial.params[f"hidden/{t}/variant"]) for t in ("linear1", "linear2")
            }
    best_file = tmp_path / "runs" / "s" / "best_plan.yaml"
    assert (
        DropoutPlan.load(best_file)
        == winner(study)[0]
        == DropoutPlan.from_yaml(study.best_trial.user_attrs["plan"])
    )

    # `best` prints and writes the same plan
    out = tmp_path / "best.yaml"
    assert main(["best", "s", "--storage", url, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header, _, body = printed.partition("\n")
    assert header.startswith("# best plan of s: ")
    assert DropoutPlan.from_yaml(body) == DropoutPlan.load(best_file)
    assert out.read_text() == best_file.read_text()

    assert main(["best", "nope", "--storage", url]) == 2
    assert "studies there: ['s']" in one_error(capsys)

    # resume to a larger total (stored trials count), the baseline not enqueued again
    assert tune(config, tmp_path, data_dir, "--study.n_trials=3") == 0
    trials = load(tmp_path).get_trials()
    assert [t.number for t in trials if t.state in FINISHED] == [0, 1, 2]
    assert "hidden/linear1/variant" in trials[2].params
    assert [t.number for t in trials if "baseline" in t.user_attrs] == [0]
    assert all("plan" in t.user_attrs and "metrics" in t.user_attrs for t in trials)


class MLPWithDropout(MLP):
    """The zoo MLP with dropout of its own after the first layer."""

    def __init__(self, hidden: int = 16, lr: float = 1e-2) -> None:
        super().__init__(hidden=hidden, lr=lr)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.linear1(x).relu())
        h = h + self.linear2(h).relu()
        return self.linear3(h)


def test_baselines_for_a_model_with_its_own_dropout(tmp_path, data_dir):
    model = {"class_path": f"{__name__}.MLPWithDropout", "init_args": {"hidden": 16}}
    config = write_config(tmp_path, model=model, study={"n_trials": 2})
    assert tune(config, tmp_path, data_dir) == 0
    trials = load(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.user_attrs.get("baseline") for t in trials] == ["no dropout", "as written"]
    off = DropoutPlan.from_yaml(trials[0].user_attrs["plan"])
    assert [(s.key, s.p) for s in off] == [("drop:replace", 0.0)]  # the model's own dropout switched off
    assert len(DropoutPlan.from_yaml(trials[1].user_attrs["plan"])) == 0  # as written: nothing changed

    # enqueued once per study, however often `tune` starts
    tuner = Tuner(["--config", str(config), "--study.warm_start=false"])
    study = optuna.create_study(direction="maximize")
    tuner.enqueue_fixed(study)
    tuner.enqueue_fixed(study)
    assert [t.user_attrs.get("baseline") for t in study.get_trials()] == ["no dropout", "as written"]
    assert all(t.state == TrialState.WAITING and t.params == {} for t in study.get_trials())

    off_tuner = Tuner(["--config", str(config), "--study.baselines=false", "--study.warm_start=false"])
    study = optuna.create_study(direction="maximize")
    off_tuner.enqueue_fixed(study)
    assert study.get_trials() == []


def test_inert_dropout_slots_are_not_a_baseline(tmp_path):
    """The Transformer zoo model's p=0 nn.Dropout slots are no dropout of its own: one baseline."""
    model = {"class_path": "lightning_dropout.zoo.TransformerEncoderClassifier", "init_args": {}}
    tuner = Tuner(["--config", str(write_config(tmp_path, model=model)), "--study.warm_start=false"])
    study = optuna.create_study(direction="maximize")
    tuner.enqueue_fixed(study)
    assert [t.user_attrs.get("baseline") for t in study.get_trials()] == ["no dropout"]


def test_a_fixed_trial_enqueued_twice_runs_once(tmp_path, data_dir, monkeypatch):
    """Two `tune` processes starting on one storage at once can both find the study empty and both enqueue the
    baselines and the grid: the later twin of each is recorded as a duplicate, never trained, and does not
    count towards n_trials."""
    config = write_config(tmp_path, study={"n_trials": 3, "warm_start": True, "warm_start_rates": [0.2]})
    args = [
        "--config",
        str(config),
        f"--study.run_dir={tmp_path / 'runs'}",
        f"--data.init_args.cache_dir={data_dir}",
    ]
    tuner = Tuner(args)
    study = tuner.study()
    tuner.enqueue_fixed(study)
    for trial in study.get_trials():  # the other process, finding the study empty too, enqueued the same
        study.enqueue_trial(trial.params, user_attrs=dict(trial.user_attrs), skip_if_exists=False)
    trained: list[int] = []
    train = tuner.train
    monkeypatch.setattr(tuner, "train", lambda *a, **k: (trained.append(1), train(*a, **k))[1])
    tuner.run_worker()

    trials = load(tmp_path).get_trials()
    labels = [t.user_attrs.get("baseline") or t.user_attrs.get("warm_start") for t in trials]
    assert labels[:4] == ["no dropout", "uniform p=0.2"] * 2
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE] * 2
    assert [t.state for t in trials[2:4]] == [TrialState.FAIL] * 2
    assert all("duplicate" in t.user_attrs["fail_reason"] for t in trials[2:4])
    # the duplicates cost no training and no room: a third, sampled trial still ran
    assert [t.state for t in trials[4:]] == [TrialState.COMPLETE] and "hidden/linear1/variant" in trials[
        4
    ].params
    assert len(trained) == 3


def test_a_failed_fixed_trial_does_not_make_its_retry_a_duplicate():
    """The heartbeat's retry of a killed worker's fixed trial keeps its label, as does the re-run of an
    interrupted one: an earlier *failed* twin does not block it; a live one does."""
    from lightning_dropout.tune.fixed import duplicate_of

    study = optuna.create_study(direction="maximize")
    attrs = {"warm_start": "uniform p=0.2"}
    study.enqueue_trial({}, user_attrs=attrs)
    killed = study.ask()
    study.tell(killed, state=TrialState.FAIL)  # what the heartbeat does to a killed worker's trial
    study.enqueue_trial({}, user_attrs=attrs)
    study.enqueue_trial({}, user_attrs=attrs)
    retry, twin = study.ask(), study.ask()
    assert duplicate_of(retry) is None
    assert duplicate_of(twin) == retry.number
    assert duplicate_of(study.ask()) is None  # a sampled trial has no label


# ----------------------------------------------------------------------------------------------------------
# 4. Faults
# ----------------------------------------------------------------------------------------------------------
def test_a_group_whose_variant_cannot_apply_fails_before_trial_0(tmp_path, data_dir, capsys):
    # every trial choosing `spatial` would fail on the Linear sites: refused at once, not trial after trial
    group = {"name": "hidden", "select": {"match": "Linear"}, "variants": ["spatial"], "p": [0.1, 0.5]}
    config = write_config(tmp_path, dropout={"groups": [group]})
    assert tune(config, tmp_path, data_dir) == 2
    line = one_error(capsys)
    assert "dropout.groups['hidden']" in line and "linear1:output" in line and "spatial" in line
    assert not (tmp_path / "runs").exists()


def test_diverging_trial_fails_with_nan_reason(tmp_path, data_dir):
    config = write_config(
        tmp_path,
        model={"init_args": {"hidden": 16, "lr": 1e30}},
        study={"metric": "val_loss", "direction": "minimize", "n_trials": 2},
    )
    # no trial completes: the command fails in one line and writes no best plan
    assert tune(config, tmp_path, data_dir) == 2
    assert not (tmp_path / "runs" / "s" / "best_plan.yaml").exists()
    trials = load(tmp_path).get_trials()
    assert [t.state for t in trials] == [
        TrialState.FAIL,
        TrialState.FAIL,
    ]  # the study went on after a failure
    for trial in trials:
        assert "NaN" in trial.user_attrs["fail_reason"]
        assert math.isnan(trial.user_attrs["metrics"]["val_loss"])


@pytest.mark.parametrize(
    ("trainer", "reason"),
    [
        ({"max_epochs": 0}, "no training step ran"),
        ({"limit_train_batches": 0}, "no training step ran"),
        ({"val_check_interval": 50}, "val_check_interval"),  # beyond the epoch's 3 batches
    ],
    ids=["max_epochs-0", "limit_train_batches-0", "val_check_interval-beyond-the-epoch"],
)
def test_a_study_whose_trials_fail_alike_stops_after_three_in_one_line_and_exits_2(
    tmp_path, data_dir, capsys, trainer, reason
):
    """A config that makes every trial fail the same way (or train nothing) is not a success: the study stops
    after the first 3 such trials, says why in one line, exits 2, and never calls it a divergence."""
    config = write_config(tmp_path, trainer=trainer, study={"n_trials": 6})
    assert tune(config, tmp_path, data_dir) == 2
    trials = load(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all(reason in t.user_attrs["fail_reason"] for t in trials), [t.user_attrs for t in trials]
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lightning-dropout:")]
    assert len(errors) == 1, errors
    assert "every trial failed for the same reason, so the study stopped after 3" in errors[0]
    assert reason in errors[0] and "diverged" not in err


# ----------------------------------------------------------------------------------------------------------
# 5. Pruning
# ----------------------------------------------------------------------------------------------------------
def test_threshold_pruner_prunes_after_reporting_each_epoch(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 2, "baselines": False})  # baselines are never pruned
    pruner = '--study.pruner={"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 0.99, "n_warmup_steps": 1}}'
    rc = tune(config, tmp_path, data_dir, pruner)
    trials = load(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    for trial in trials:
        assert sorted(trial.intermediate_values) == [0, 1]  # reported at each epoch, pruned after the warm-up
        assert "plan" in trial.user_attrs and "metrics" in trial.user_attrs
    # every trial pruned: no completed trial, no best plan
    assert rc == 0 and not (tmp_path / "runs" / "s" / "best_plan.yaml").exists()


# The `pruner: null` case (nothing pruned) is checked in test_study_end_to_end_best_and_resume.


# ----------------------------------------------------------------------------------------------------------
# 6. Re-runs over seeds and the winner
# ----------------------------------------------------------------------------------------------------------
def test_the_baselines_reruns_are_known_once_the_baselines_finish_and_the_race_runs_round_by_round():
    from lightning_dropout.tune import StudyConfig
    from lightning_dropout.tune.reruns import Claims, baseline_jobs, rerun_jobs

    cfg = StudyConfig(seeds=2, top_k=1)
    study = optuna.create_study(direction="maximize")
    baseline = study.ask()
    baseline.set_user_attr("baseline", "no dropout")
    assert baseline_jobs(study, cfg) is None  # still running: the candidates are not known
    sampled = study.ask()
    study.tell(baseline, 0.5)
    early = baseline_jobs(study, cfg)  # the sampled trial is still running
    assert early is not None and [(j.trial.number, j.index) for j in early] == [(0, 0), (0, 1)]
    study.tell(sampled, 0.7)
    jobs, race = rerun_jobs(study, cfg)
    # round 0 only: the next round is known once its values are in (the race may drop a candidate)
    assert [(j.trial.number, j.index) for j in jobs] == [(1, 0), (0, 0)] and not race.finished
    for job in jobs:
        study.set_user_attr(job.key, 0.6)
    jobs, race = rerun_jobs(study, cfg)
    assert [(j.trial.number, j.index) for j in jobs] == [(1, 0), (0, 0), (1, 1), (0, 1)]
    assert jobs[0].seed == jobs[1].seed != jobs[2].seed == jobs[3].seed  # paired: one seed a round
    claims = Claims()  # positions handed out once
    assert [claims.next_below(2) for _ in range(3)] == [0, 1, None]
    assert [claims.next_below(len(jobs)) for _ in range(3)] == [2, 3, None]
    assert baseline_jobs(study, StudyConfig(budget=10)) == []  # under a budget only the race spends


def test_reruns_over_seeds_pick_the_best_mean(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 2, "seeds": 2, "top_k": 1, "winner": "best_mean"})
    assert tune(config, tmp_path, data_dir) == 0
    study = load(tmp_path)
    reruns = study.user_attrs["reruns"]
    assert set(reruns) == {"0", "1"}  # the best sampled trial and the baseline
    assert reruns["0"]["label"] == "no dropout" and reruns["1"]["label"] == "trial 1"
    assert all(len(r["values"]) == 2 for r in reruns.values())
    means = {int(k): sum(r["values"]) / 2 for k, r in reruns.items()}
    best = max(means.values())
    expected = [
        DropoutPlan.from_yaml(study.trials[n].user_attrs["plan"]) for n, m in means.items() if m == best
    ]
    plan, label = winner(study)
    assert plan in expected and "mean over 2 seeds" in label
    assert DropoutPlan.load(tmp_path / "runs" / "s" / "best_plan.yaml") == plan


def _synthetic_study(
    direction: str, values: dict[int, float], reruns: dict[str, list[float]]
) -> optuna.Study:
    study = optuna.create_study(direction=direction)
    for number, value in values.items():
        plan = DropoutPlan.from_dict(
            {"sites": [{"target": "linear1", "variant": "standard", "p": 0.1 * (number + 1)}]}
        )
        study.add_trial(
            optuna.trial.create_trial(
                value=value, user_attrs={"plan": plan.to_yaml()}, params={}, distributions={}
            )
        )
    study.set_user_attr("reruns", {k: {"label": f"trial {k}", "values": v} for k, v in reruns.items()})
    study.set_user_attr("winner_rule", "best_mean")  # the one_se rule: tests/test_tune_selection.py
    return study


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_winner_prefers_the_rerun_mean_over_the_single_best_trial(direction):
    sign = 1 if direction == "maximize" else -1
    values = {0: sign * 0.5, 1: sign * 0.9, 2: sign * 0.7}  # trial 1 is the best single run
    reruns = {
        "1": [sign * 0.9, sign * 0.1],  # lucky once
        "2": [sign * 0.7, sign * 0.6, math.nan],  # the best mean, NaN ignored
        "0": [sign * 0.5, sign * 0.5],
    }
    study = _synthetic_study(direction, values, reruns)
    plan, label = winner(study)
    assert [s.p for s in plan] == pytest.approx([0.3]) and label.startswith("trial 2")
    no_reruns = _synthetic_study(direction, values, {})
    assert [s.p for s in winner(no_reruns)[0]] == pytest.approx([0.2])  # no re-runs: the best single trial


# ----------------------------------------------------------------------------------------------------------
# 7. fit CONFIG --plan PLAN
# ----------------------------------------------------------------------------------------------------------
def test_fit_with_a_plan_reports_val_and_test_metrics(tmp_path, data_dir, capsys):
    plan = DropoutPlan.from_dict({"sites": [{"target": "linear1", "variant": "gaussian", "p": 0.2}]})
    plan_path = plan.save(tmp_path / "plan.yaml")
    args = [
        "fit",
        str(write_config(tmp_path)),
        "--plan",
        str(plan_path),
        f"--data.init_args.cache_dir={data_dir}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for metric in ("val_acc", "val_loss", "test_acc", "test_loss"):
        assert re.search(rf"^{metric}\s+\d+\.\d{{4}}$", out, re.MULTILINE), out

    # the plan is really applied: one naming a module the model lacks is refused
    DropoutPlan.from_dict({"sites": [{"target": "linear9", "variant": "standard", "p": 0.2}]}).save(plan_path)
    assert main(args) == 2
    assert "linear9" in one_error(capsys)


# ----------------------------------------------------------------------------------------------------------
# 8. Journal storage
# ----------------------------------------------------------------------------------------------------------
def test_journal_storage_end_to_end(tmp_path, data_dir, capsys):
    journal = tmp_path / "journal" / "j.log"
    config = write_config(tmp_path, study={"n_trials": 2, "storage": f"journal:{journal}"})
    assert tune(config, tmp_path, data_dir) == 0
    assert journal.is_file() and not (tmp_path / "runs" / "s" / "study.db").exists()
    study = open_study("s", f"journal:{journal}")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.COMPLETE]
    capsys.readouterr()
    assert main(["best", "s", "--storage", f"journal:{journal}"]) == 0
    body = capsys.readouterr().out.partition("\n")[2]
    assert DropoutPlan.from_yaml(body) == DropoutPlan.load(tmp_path / "runs" / "s" / "best_plan.yaml")


class FakeContext:
    """A multiprocessing context whose processes are recorded, never started: each is dead on arrival, with
    ``exitcode``, having done nothing."""

    def __init__(self, exitcode: int = 0) -> None:
        self.exitcode = exitcode
        self.started: list[tuple[Any, ...]] = []

    def Process(self, target, args, name):  # multiprocessing's name
        context = self

        class _Process:
            exitcode = context.exitcode

            def start(self) -> None:
                assert target.__name__ == "start_worker" and args[0].endswith(":worker_main"), (target, args)
                context.started.append(args[1:])  # worker_main's own arguments

            def is_alive(self) -> bool:
                return False

            def join(self, timeout: float | None = None) -> None:
                pass

            def terminate(self) -> None:
                pass

        return _Process()

    def Event(self):  # multiprocessing's name
        import threading

        return threading.Event()

    def Value(self, typecode, value, lock=True):  # multiprocessing's name
        import threading
        import types

        guard = threading.Lock()
        return types.SimpleNamespace(value=value, get_lock=lambda: guard)


class RunProbe(L.Callback):
    """Appends ``<process id> <logger version>`` of every run it sees to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {trainer.logger.version if trainer.logger else '-'}\n")


def _runs(record: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in record.read_text().splitlines()]  # type: ignore[misc]


class HoldingRunProbe(RunProbe):
    """A :class:`RunProbe` that holds the first re-run of process ``hold`` until a re-run of another process has
    started (at most ``timeout`` seconds): the other workers then take part whatever their start-up time."""

    def __init__(self, path: str, hold: int, timeout: float = 60.0) -> None:
        super().__init__(path)
        self.hold, self.timeout = hold, timeout

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        held = Path(self.path + ".held")  # one hold per study: each run builds its own probe
        if os.getpid() != self.hold or not str(trainer.logger.version).startswith("rerun_") or held.exists():
            return
        held.touch()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if any(pid != str(self.hold) and v.startswith("rerun_") for pid, v in _runs(Path(self.path))):
                return
            time.sleep(0.1)


def _probe(record: Path, name: str = "RunProbe", **init_args: Any) -> str:
    return "--trainer.callbacks=" + json.dumps(
        [{"class_path": f"test_tune.{name}", "init_args": {"path": str(record), **init_args}}]
    )


def test_worker_0_runs_in_the_tune_process(tmp_path, data_dir, monkeypatch):
    from lightning_dropout.tune import workers

    context = FakeContext()
    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: context)
    record = tmp_path / "runs.txt"
    config = write_config(tmp_path, study={"n_trials": 2, "workers": 3})
    assert tune(config, tmp_path, data_dir, _probe(record)) == 0
    # two other workers were spawned (indices 1 and 2); this process, worker 0, trained the trials itself
    assert [args[1] for args in context.started] == [1, 2]
    assert [pid for pid, _ in _runs(record)] == [str(os.getpid())] * 2
    assert [t.state for t in load(tmp_path).get_trials()] == [TrialState.COMPLETE] * 2


def test_two_workers_share_the_reruns(tmp_path, data_dir):
    """After the trials, the spawned worker stays for its share of the re-runs: each re-run runs once, both
    processes run some, and the table gathers them all."""
    record = tmp_path / "runs.txt"
    config = write_config(tmp_path, study={"n_trials": 2, "workers": 2, "seeds": 2, "top_k": 1})
    # this process holds its first re-run until the spawned worker has started one (its import takes seconds,
    # tiny runs take less): without the sharing, the hold times out and this process runs all four
    probe = _probe(record, "HoldingRunProbe", hold=os.getpid(), timeout=60)
    assert tune(config, tmp_path, data_dir, probe) == 0
    reruns = [(pid, version) for pid, version in _runs(record) if version.startswith("rerun_")]
    assert len({version for _, version in reruns}) == len(reruns) == 4  # 2 candidates x 2 seeds, each once
    by_pid = {pid: sum(p == pid for p, _ in reruns) for pid, _ in reruns}
    assert str(os.getpid()) in by_pid and len(by_pid) == 2
    study = load(tmp_path)
    table = study.user_attrs["reruns"]
    assert {k: len(v["values"]) for k, v in table.items()} == {"0": 2, "1": 2}
    for number, info in table.items():  # each value is the one its worker stored
        stored = [study.user_attrs[f"rerun_value:{number}:{i}"] for i in range(2)]
        assert info["values"] == pytest.approx(stored, nan_ok=True)


def test_reruns_a_dead_worker_left_run_in_the_tune_process(tmp_path, data_dir, monkeypatch):
    from lightning_dropout.tune import workers

    context = FakeContext()  # the spawned worker never runs: its share of the re-runs falls to this process
    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: context)
    record = tmp_path / "runs.txt"
    config = write_config(tmp_path, study={"n_trials": 2, "workers": 2, "seeds": 2, "top_k": 1})
    assert tune(config, tmp_path, data_dir, _probe(record)) == 0
    reruns = [(pid, version) for pid, version in _runs(record) if version.startswith("rerun_")]
    assert len(reruns) == 4 and {pid for pid, _ in reruns} == {str(os.getpid())}
    assert all(len(v["values"]) == 2 for v in load(tmp_path).user_attrs["reruns"].values())


def test_a_stored_rerun_value_is_gathered_not_run_again(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 2, "seeds": 0})
    assert tune(config, tmp_path, data_dir) == 0
    load(tmp_path).set_user_attr("rerun_value:0:1", 0.9876)  # trial 0 (no dropout), second seed: run before
    record = tmp_path / "runs.txt"
    assert (
        tune(write_config(tmp_path, study={"n_trials": 2, "seeds": 2}), tmp_path, data_dir, _probe(record))
        == 0
    )
    versions = sorted(version for _, version in _runs(record))
    assert versions == ["rerun_0000_seed0", "rerun_0001_seed0", "rerun_0001_seed1"]
    values = load(tmp_path).user_attrs["reruns"]["0"]["values"]
    assert values[1] == 0.9876 and values[0] != 0.9876


def test_a_spawned_worker_stopping_on_a_config_error_exits_2(tmp_path, data_dir, monkeypatch, capsys):
    from lightning_dropout.tune import workers

    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: FakeContext(exitcode=2))
    config = write_config(tmp_path, study={"n_trials": 1, "workers": 2})
    assert tune(config, tmp_path, data_dir) == 2
    assert "a worker stopped the study on a configuration error" in one_error(capsys)


# ----------------------------------------------------------------------------------------------------------
# 9. Redaction of storage passwords
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        ("postgresql+psycopg2://user:secret@host:5432/db", "postgresql+psycopg2://user:***@host:5432/db"),
        ("mysql://root:p%40ss@localhost/optuna", "mysql://root:***@localhost/optuna"),
        ("postgresql://user:se:cr:et@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("postgresql://host/db", "postgresql://host/db"),
        ("sqlite:////tmp/runs/s/study.db", "sqlite:////tmp/runs/s/study.db"),
        ("journal:/tmp/runs/j.log", "journal:/tmp/runs/j.log"),
    ],
)
def test_redact(url, expected):
    assert redact(url) == expected


def test_redact_password_without_user():
    assert "secret" not in redact("postgresql://:secret@host/db")


def test_redact_password_in_query():
    assert "secret" not in redact("postgresql://host/db?user=u&password=secret")


def test_password_never_printed_when_the_database_is_unreachable(tmp_path, data_dir, capsys):
    url = "postgresql+psycopg2://optuna:hunter2@127.0.0.1:1/optuna"  # port 1: refused at once
    config = write_config(tmp_path)
    try:
        tune(config, tmp_path, data_dir, f"--study.storage={url}")
        raised = ""
    except Exception as err:  # the driver's own error (or ImportError without it) may escape main
        raised = "".join(traceback.format_exception(err))
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err + raised


# ----------------------------------------------------------------------------------------------------------
# 10. Multi-process (DDP) trials
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--trainer.devices=2", "--trainer.strategy=ddp"], True),
        (["--trainer.devices=2", "--trainer.strategy=ddp_find_unused_parameters_true"], True),
        (["--trainer.devices=1", "--trainer.num_nodes=2", "--trainer.strategy=ddp"], True),
        (["--trainer.devices=1", "--trainer.strategy=ddp"], False),
        (["--trainer.devices=2", "--trainer.strategy=ddp_spawn"], False),
        (["--trainer.devices=1"], False),
        pytest.param(
            [
                "--trainer.devices=2",
                '--trainer.strategy={"class_path": "lightning.pytorch.strategies.DDPStrategy"}',
            ],
            True,
            id="ddp-class-path",
        ),
    ],
)
def test_multiprocess(mlp_config, extra, expected):
    assert Tuner(["--config", str(mlp_config), *extra]).multiprocess is expected


# ----------------------------------------------------------------------------------------------------------
# 11. Common random numbers (DropoutInjector(dropout_seed=...))
# ----------------------------------------------------------------------------------------------------------
def _fit(
    plan: dict[str, float], dropout_seed: int | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], DropoutInjector]:
    L.seed_everything(0, verbose=False)
    model = TinyNet()
    rules = [Rule(name=[target], p=p) for target, p in plan.items()]
    injector = DropoutInjector(rules=rules, dropout_seed=dropout_seed, log_rates=False)
    trainer(callbacks=[injector], max_epochs=2).fit(model, loader(), loader())
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return torch.get_rng_state(), weights, injector


def test_dropout_seed_leaves_the_global_generator_alone():
    small = {"fc1": 0.2}
    large = {"fc1": 0.5, "fc2": 0.3}  # different rates and more masks
    state_small, _, _ = _fit(small, dropout_seed=7)
    state_large, _, _ = _fit(large, dropout_seed=7)
    assert torch.equal(state_small, state_large)
    # ... and it is the state of a run without dropout
    L.seed_everything(0, verbose=False)
    trainer(max_epochs=2).fit(TinyNet(), loader(), loader())
    assert torch.equal(state_small, torch.get_rng_state())
    # without a dropout seed the masks come from the global generator
    unseeded_small, _, _ = _fit(small, dropout_seed=None)
    unseeded_large, _, _ = _fit(large, dropout_seed=None)
    assert not torch.equal(unseeded_small, unseeded_large)


def test_dropout_seed_reproduces_training_and_is_checkpointed():
    plan = {"fc1": 0.3, "fc2": 0.3}
    _, first, injector = _fit(plan, dropout_seed=7)
    _, again, _ = _fit(plan, dropout_seed=7)
    _, other, _ = _fit(plan, dropout_seed=8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)

    state = injector.state_dict()
    fresh = torch.Generator().manual_seed(7).get_state()
    assert torch.equal(state["generator"], injector._generator.get_state())
    assert not torch.equal(state["generator"], fresh)  # masks were drawn from it
    # a restored callback continues from the saved generator state
    restored = DropoutInjector(rules=[Rule(name=list(plan), p=0.3)], dropout_seed=7)
    restored.load_state_dict(state)
    model = TinyNet()
    restored.inject(model)

    class _Trainer:
        global_rank = 0
        is_global_zero = True
        optimizers: list[Any] = []
        loggers: list[Any] = []

    restored.on_fit_start(_Trainer(), model)  # type: ignore[arg-type]
    assert torch.equal(restored._generator.get_state(), state["generator"])
    assert all(h.module.generator is restored._generator for h in restored._handles if h.module is not None)
