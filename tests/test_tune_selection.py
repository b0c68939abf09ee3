"""Noise-aware tuning: trial-value estimators, the warm-start grid and enqueued trials, paired re-runs and the
winner rule (issue 9)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState
from rich.console import Console
from torch import nn

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.tune import StudyConfig, winner
from lightning_dropout.tune.selection import Candidate, choose_winner, paired_gain, t_quantile
from lightning_dropout.tune.space import SearchGroup, suggest_plan, uniform_params
from lightning_dropout.tune.study import results_table, verdict
from lightning_dropout.tune.value import ESTIMATORS, trial_value
from tests.studies import load, tune, write_config

# ----------------------------------------------------------------------------------------------------------
# Trial values from a validation curve
# ----------------------------------------------------------------------------------------------------------
CURVE = [0.50, 0.61, 0.58, 0.66, 0.60, 0.59, 0.57]


@pytest.mark.parametrize(
    ("estimator", "window", "expected"),
    [
        ("best", 5, 0.66),
        ("last", 5, 0.57),
        ("tail", 3, (0.60 + 0.59 + 0.57) / 3),
        ("window", 3, (0.58 + 0.66 + 0.60) / 3),  # centred on the best (index 3)
        ("window", 5, (0.61 + 0.58 + 0.66 + 0.60 + 0.59) / 5),
        ("window", 10, sum(CURVE) / len(CURVE)),  # longer than the curve: all of it
    ],
)
def test_estimators_on_a_curve(estimator, window, expected):
    assert trial_value(CURVE, estimator, maximize=True, window=window) == pytest.approx(expected)


def test_window_at_the_end_of_the_curve_is_shifted_inwards():
    curve = [0.1, 0.2, 0.3, 0.4, 0.9]
    assert trial_value(curve, "window", maximize=True, window=3) == pytest.approx((0.3 + 0.4 + 0.9) / 3)


def test_ema_is_the_best_of_the_smoothed_curve():
    alpha = 2 / (3 + 1)
    smoothed, s = [], None
    for v in CURVE:
        s = v if s is None else alpha * v + (1 - alpha) * s
        smoothed.append(s)
    assert trial_value(CURVE, "ema", maximize=True, window=3) == pytest.approx(max(smoothed))


def test_minimized_metric_uses_the_lowest_point():
    loss = [1.0, 0.7, 0.5, 0.6, 0.9]
    assert trial_value(loss, "best", maximize=False) == 0.5
    assert trial_value(loss, "window", maximize=False, window=3) == pytest.approx((0.7 + 0.5 + 0.6) / 3)


def test_estimators_ignore_nan_and_an_all_nan_curve_has_no_value():
    assert trial_value([0.5, math.nan, 0.7], "best", maximize=True) == 0.7
    assert trial_value([0.5, math.nan, 0.7], "window", maximize=True, window=3) == pytest.approx(0.6)
    for estimator in ESTIMATORS:
        assert math.isnan(trial_value([math.nan, math.nan], estimator, maximize=True))


def test_estimator_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`estimator` must be one of \['best'"):
        trial_value(CURVE, "median", maximize=True)
    with pytest.raises(ValueError, match="`window` must be an integer >= 1, but got window=0"):
        trial_value(CURVE, "window", maximize=True, window=0)


# ----------------------------------------------------------------------------------------------------------
# Paired gains and the winner rule
# ----------------------------------------------------------------------------------------------------------
def _candidate(label: str, values: list[float], amount: float) -> Candidate:
    return Candidate(label, 0, DropoutPlan(), values, amount)


def test_paired_gain_uses_seed_by_seed_differences():
    # raw spreads of 0.1 between seeds, but a constant +0.02 per seed: the paired interval is tight
    a = _candidate("a", [0.70, 0.80, 0.60], 0.2)
    b = _candidate("b", [0.68, 0.78, 0.58], 0.0)
    gain = paired_gain(a, b, maximize=True)
    assert gain.mean == pytest.approx(0.02) and gain.stderr == pytest.approx(0.0, abs=1e-12)
    assert gain.significant and gain.n == 3
    assert paired_gain(b, a, maximize=True).mean == pytest.approx(-0.02)
    assert paired_gain(a, b, maximize=False).mean == pytest.approx(-0.02)  # lower is better when minimizing


def test_paired_gain_interval_is_student_t():
    a = _candidate("a", [0.70, 0.74, 0.69], 0.2)
    b = _candidate("b", [0.68, 0.70, 0.70], 0.0)
    diffs = [0.02, 0.04, -0.01]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    gain = paired_gain(a, b, maximize=True)
    assert gain.half_width == pytest.approx(4.303 * sd / math.sqrt(3))
    assert gain.low < 0 < gain.high and not gain.significant
    assert t_quantile(2) == pytest.approx(4.303) and t_quantile(1000) == pytest.approx(1.96)


def test_paired_gain_leaves_out_failed_seeds():
    a = _candidate("a", [0.7, math.nan, 0.8], 0.2)
    b = _candidate("b", [0.6, 0.6, math.nan], 0.0)
    gain = paired_gain(a, b, maximize=True)
    assert gain.n == 1 and gain.mean == pytest.approx(0.1) and not gain.significant


def test_one_se_prefers_less_dropout_when_the_means_tie_within_the_noise():
    heavy = _candidate("heavy", [0.66, 0.60, 0.65], 1.0)  # best mean, by less than the noise
    light = _candidate("light", [0.64, 0.61, 0.64], 0.2)
    none = _candidate("no dropout", [0.60, 0.55, 0.62], 0.0)  # clearly worse
    assert choose_winner([heavy, light, none], maximize=True, rule="best_mean") is heavy
    assert choose_winner([heavy, light, none], maximize=True) is light


def test_one_se_keeps_the_best_when_it_is_better_by_more_than_the_noise():
    best = _candidate("best", [0.70, 0.66, 0.69], 0.8)
    light = _candidate("light", [0.64, 0.60, 0.63], 0.2)
    assert choose_winner([light, best], maximize=True) is best


def test_one_se_with_minimized_metric():
    heavy = _candidate("heavy", [0.50, 0.56, 0.51], 1.0)  # lowest loss, within the noise of light
    light = _candidate("light", [0.52, 0.55, 0.52], 0.1)
    assert choose_winner([heavy, light], maximize=False, rule="best_mean") is heavy
    assert choose_winner([heavy, light], maximize=False) is light


def test_one_se_with_one_seed_is_the_best_mean():
    heavy = _candidate("heavy", [0.66], 1.0)
    light = _candidate("light", [0.65], 0.2)
    assert choose_winner([heavy, light], maximize=True) is heavy


def test_winner_rule_is_checked():
    with pytest.raises(ValueError, match=r"`rule` must be one of \['one_se', 'best_mean'\]"):
        choose_winner([_candidate("a", [1.0], 0.0)], maximize=True, rule="vote")


def test_table_and_verdict_say_when_the_gain_is_within_the_noise():
    none = _candidate("no dropout", [0.60, 0.64, 0.61], 0.0)
    uniform = _candidate("uniform p=0.2", [0.61, 0.63, 0.62], 0.4)
    tuned = _candidate("trial 7", [0.70, 0.74, 0.71], 0.9)  # +0.1 on every seed over no dropout
    ranked = [tuned, uniform, none]
    lines = verdict(ranked, maximize=True, rule="one_se", metric="val_acc")
    assert (
        lines[1].startswith("trial 7 vs no dropout: +0.1000 val_acc") and "by more than the noise" in lines[1]
    )
    assert "trial 7 vs uniform p=0.2" in lines[2] and "better, by more than the noise" in lines[2]
    close = verdict([uniform, none], maximize=True, rule="best_mean", metric="val_acc")
    assert close[1].endswith("within the noise: these seeds cannot tell them apart.")
    console = Console(width=300, record=True)
    console.print(results_table(ranked, "val_acc", maximize=True))
    text = console.export_text()
    assert "trial 7 (winner)" in text
    assert "+0.1000 ± 0.0000 *" in text  # the gain vs no dropout, its interval, more than the noise


def test_the_rich_table_shows_the_shared_comparison_rows():
    """One ``comparison_rows`` feeds `tune`'s table, the Markdown results and the HTML report: the same
    columns and cells (a NaN mean shows as ``-`` in all three; a dropped candidate says so in all three)."""
    from lightning_dropout.tune.report import comparison_rows
    from lightning_dropout.tune.selection import compare

    none = _candidate("no dropout", [0.5, 0.6, 0.7], 0.0)
    tuned = Candidate("trial 7", 7, DropoutPlan(), [0.6, 0.7, 0.8], 0.2)
    broken = Candidate("trial 9", 9, DropoutPlan(), [math.nan, math.nan], 0.3, dropped_after=2)
    ranked = [tuned, none, broken]
    header, rows = comparison_rows(compare(ranked, True, "one_se"), "")
    console = Console(width=400, record=True)
    console.print(results_table(ranked, "val_acc", maximize=True))
    text = console.export_text()
    for cell in [*header[1:], *(c for row in rows for c in row if c)]:
        assert cell.strip() in text, cell
    assert rows[-1][2] == "-" and rows[-1][4] == "2 (dropped)"
    assert rows[0][0] == "trial 7 (winner)"


# ----------------------------------------------------------------------------------------------------------
# The warm-start grid
# ----------------------------------------------------------------------------------------------------------
def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_uniform_params_give_the_uniform_plan():
    import optuna

    group = SearchGroup("hidden", {"match": "Linear"}, ["gaussian", "standard"], p=[0.0, 0.5], per_layer=True)
    params = uniform_params([group], _net(), 0.3)
    assert params == {
        "hidden/0/variant": "gaussian",
        "hidden/0/gaussian/p": 0.3,
        "hidden/2/variant": "gaussian",
        "hidden/2/gaussian/p": 0.3,
    }
    study = optuna.create_study()
    study.enqueue_trial(params)
    plan = suggest_plan(study.ask(), [group], _net(), torch.zeros(1, 4))
    assert [(s.target, s.variant, s.p) for s in plan] == [("0", "gaussian", 0.3), ("2", "gaussian", 0.3)]


def test_uniform_params_clip_the_rate_and_fix_the_other_choices():
    group = SearchGroup(
        "conv",
        {"match": "Linear"},
        ["dropblock", "standard"],
        p=[0.05, 0.3],
        params={"dropblock": {"block_size": [5, 3]}},
        depth_scaling=["none", "linear"],
    )
    assert uniform_params([group], _net(), 0.5) == {
        "conv/variant": "dropblock",
        "conv/dropblock/p": 0.3,
        "conv/dropblock/block_size": 5,
        "conv/depth_scaling": "none",
    }


def test_a_study_starts_with_the_baseline_and_the_warm_start_grid(tmp_path, data_dir):
    study_section = {
        "n_trials": 6,
        "warm_start": True,
        "warm_start_rates": [0.1, 0.2, 0.5, 0.6],  # 0.5 and 0.6 both clip to the group's 0.5: one trial
        "value": "window",
        "seeds": 2,
        "top_k": 1,
    }
    config = write_config(tmp_path, study=study_section)
    assert tune(config, tmp_path, data_dir) == 0
    study = load(tmp_path)
    trials = study.get_trials()
    assert trials[0].user_attrs["baseline"] == "no dropout"
    grid = trials[1:4]
    assert [t.user_attrs["warm_start"] for t in grid] == ["uniform p=0.1", "uniform p=0.2", "uniform p=0.5"]
    for trial, rate in zip(grid, (0.1, 0.2, 0.5), strict=True):
        assert trial.state == TrialState.COMPLETE
        plan = DropoutPlan.from_yaml(trial.user_attrs["plan"])
        # the group's first variant at one rate on every site
        assert [(s.target, s.variant, s.p) for s in plan] == [
            ("linear1", "standard", pytest.approx(rate)),
            ("linear2", "standard", pytest.approx(rate)),
        ]
    assert "warm_start" not in trials[4].user_attrs and "baseline" not in trials[4].user_attrs
    assert len(trials) == 6 and study.user_attrs["value"] == "window"

    # the value is the window estimator over the reported curve
    for trial in trials:
        curve = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
        assert trial.value == pytest.approx(trial_value(curve, "window", maximize=True))

    # re-runs: the best trial, the best grid point and no dropout, all on the same seeds
    reruns = study.user_attrs["reruns"]
    labels = {r["label"] for r in reruns.values()}
    best_grid = max(grid, key=lambda t: t.value)
    assert "no dropout" in labels and best_grid.user_attrs["warm_start"] in labels
    seeds = {tuple(r["seeds"]) for r in reruns.values()}
    assert seeds == {(1000, 2000)}  # study.seed 0: the same two seeds for every candidate
    assert all(len(r["values"]) == 2 for r in reruns.values())

    # the HTML report and TensorBoard's results text carry the gains and mark the winner
    from lightning_dropout.tune.report import markdown_results, write_report

    page = write_report(study, tmp_path / "report.html").read_text()
    assert "gain vs no dropout" in page and "gain vs best uniform" in page and "(winner)" in page
    assert "(winner)" in markdown_results(study)

    # resuming does not enqueue the grid again
    assert tune(config, tmp_path, data_dir, "--study.n_trials=7") == 0
    again = load(tmp_path).get_trials()
    assert len(again) == 7 and sum("warm_start" in t.user_attrs for t in again) == 3


def test_paired_reruns_start_every_candidate_from_the_same_seeds(tmp_path, data_dir):
    """With no dropout at all, two candidates re-run on the same seeds give identical values seed by seed."""
    config = write_config(
        tmp_path,
        dropout={"groups": [{"name": "hidden", "select": {"match": "Linear"}, "p": [0.0, 0.0]}]},
        study={"n_trials": 2, "seeds": 2, "top_k": 1, "warm_start": False},
    )
    assert tune(config, tmp_path, data_dir) == 0
    reruns = load(tmp_path).user_attrs["reruns"]
    assert len(reruns) == 2  # the sampled trial (p fixed at 0: no sites) and the baseline
    first, second = (r["values"] for r in reruns.values())
    assert first == second and first[0] != first[1]  # same seed, same run; other seed, other run


def test_user_trials_are_enqueued_from_yaml(tmp_path, data_dir):
    plan_file = tmp_path / "mine.yaml"
    DropoutPlan.from_dict({"sites": [{"target": "linear2", "variant": "gaussian", "p": 0.15}]}).save(
        plan_file
    )
    enqueue = [
        {"hidden/linear1/variant": "gaussian", "hidden/linear1/gaussian/p": 0.25},
        {"sites": [{"target": "linear1", "variant": "standard", "p": 0.35}]},
        {"plan": str(plan_file)},
    ]
    config = write_config(tmp_path, study={"n_trials": 4, "enqueue": enqueue})
    assert tune(config, tmp_path, data_dir) == 0
    trials = load(tmp_path).get_trials()
    assert [t.user_attrs.get("enqueued") for t in trials] == [
        None,
        "enqueued #1",
        "enqueued #2",
        "enqueued #3",
    ]
    first = DropoutPlan.from_yaml(trials[1].user_attrs["plan"])
    assert first["linear1:output"].variant == "gaussian" and first["linear1:output"].p == pytest.approx(0.25)
    assert "hidden/linear2/variant" in trials[1].params  # not given: sampled
    assert DropoutPlan.from_yaml(trials[2].user_attrs["plan"]) == DropoutPlan.from_dict(enqueue[1])
    assert DropoutPlan.from_yaml(trials[3].user_attrs["plan"]) == DropoutPlan.load(plan_file)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"hidden/linear1/gaussian/p": 0.9},
            r"study.enqueue\[0\]: `hidden/linear1/gaussian/p` must be in \[0.05, 0.5\], but got 0.9\.",
        ),
        (
            {"hidden/linear1/variant": "alpha"},
            r"`hidden/linear1/variant` must be in \{'standard', 'gaussian'\}, but got 'alpha'",
        ),
        (
            {"hidden/linear3/variant": "standard"},
            r"`hidden/linear3/variant` must be a parameter of the search space.*nearest: \[.*'hidden/linear1/variant'",
        ),
    ],
)
def test_enqueued_parameters_are_checked_before_the_first_trial(tmp_path, data_dir, capsys, params, match):
    config = write_config(tmp_path, study={"n_trials": 2, "enqueue": [params]})
    assert tune(config, tmp_path, data_dir) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "runs" / "s" / "trials").exists()  # refused before trial 0


def test_n_trials_smaller_than_the_grid_enqueues_what_fits(tmp_path, data_dir, caplog):
    config = write_config(tmp_path, study={"n_trials": 3, "warm_start": True})
    with caplog.at_level("WARNING"):
        assert tune(config, tmp_path, data_dir) == 0
    trials = load(tmp_path).get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.user_attrs.get("warm_start") for t in trials] == [None, "uniform p=0.1", "uniform p=0.2"]
    assert "uniform p=0.3" in caplog.text and "uniform p=0.5" in caplog.text


def test_winner_of_a_study_follows_its_rule():
    import optuna

    study = optuna.create_study(direction="maximize")
    plans = {0: [], 1: [("linear1", 0.5), ("linear2", 0.5)], 2: [("linear1", 0.1)]}
    for sites in plans.values():
        plan = DropoutPlan.from_dict(
            {"sites": [{"target": t, "variant": "standard", "p": p} for t, p in sites]}
        )
        study.add_trial(
            optuna.trial.create_trial(
                value=0.5, user_attrs={"plan": plan.to_yaml()}, params={}, distributions={}
            )
        )
    reruns = {
        "0": {"label": "no dropout", "values": [0.60, 0.58, 0.61]},
        "1": {"label": "trial 1", "values": [0.66, 0.62, 0.66]},  # best mean
        "2": {"label": "trial 2", "values": [0.65, 0.63, 0.65]},  # within its noise, less dropout
    }
    study.set_user_attr("reruns", reruns)
    study.set_user_attr("winner_rule", "one_se")
    assert winner(study)[1] == "trial 2 (mean over 3 seeds)"
    study.set_user_attr("winner_rule", "best_mean")
    assert winner(study)[1] == "trial 1 (mean over 3 seeds)"


# ----------------------------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"value": "bset"},
            r"`study.value` must be one of \['best', .*\], but got 'bset'; nearest: \['best'",
        ),
        (
            {"winner": "one-se"},
            r"`study.winner` must be one of \['one_se', 'best_mean'\], .*nearest: \['one_se'",
        ),
        ({"value_window": 0}, r"`study.value_window` must be an integer >= 1, but got value_window=0"),
        (
            {"warm_start_rates": [0.1, 1.5]},
            r"`study.warm_start_rates\[1\]` must satisfy 0 <= .* but got .*=1.5",
        ),
        ({"enqueue": [3]}, r"`study.enqueue\[0\]` must be a plan .* but got 3"),
        (
            {"enqueue": [{"p": 0.1}]},
            r"`study.enqueue\[0\]` must map Optuna parameter names .* but got \['p'\]",
        ),
        ({"enqueue": [{"sites": [{"target": "a", "variant": "nope", "p": 0.1}]}]}, r"`study.enqueue\[0\]`"),
        ({"enqueue": [{"plan": "/nonexistent/plan.yaml"}]}, r"a plan file must exist"),
    ],
)
def test_study_settings_are_checked(kwargs, match):
    with pytest.raises(DropoutConfigError, match=match):
        StudyConfig(**kwargs)


def test_enqueue_items_are_normalized_once(tmp_path):
    plan_file = tmp_path / "p.yaml"
    plan_file.write_text(yaml.safe_dump({"sites": [{"target": "x", "variant": "standard", "p": 0.2}]}))
    cfg = StudyConfig(enqueue=[{"plan": str(plan_file)}, {"params": {"g/variant": "standard"}}])
    assert cfg.enqueue == [
        {"sites": [{"target": "x", "where": "output", "variant": "standard", "p": 0.2}]},
        {"params": {"g/variant": "standard"}},
    ]
    assert StudyConfig(enqueue=cfg.enqueue).enqueue == cfg.enqueue  # re-parsing in a worker changes nothing


# ----------------------------------------------------------------------------------------------------------
# Pruning fairness and threads
# ----------------------------------------------------------------------------------------------------------
THRESHOLD = '--study.pruner={"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 0.99}}'


def test_fixed_trials_report_but_are_never_pruned(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 4, "warm_start": True, "warm_start_rates": [0.1, 0.2]})
    assert tune(config, tmp_path, data_dir, THRESHOLD) == 0
    trials = load(tmp_path).get_trials()
    # no trial reaches val_acc 0.99: the sampled one is pruned, the baseline and the grid run to the end
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    assert all(sorted(t.intermediate_values) == [0, 1] for t in trials[:3])


@pytest.mark.parametrize(("prune_after", "reported"), [(0.0, [0]), (0.5, [0, 1]), (1.0, [0, 1, 2, 3])])
def test_the_pruner_is_asked_only_from_prune_after(tmp_path, data_dir, prune_after, reported):
    config = write_config(
        tmp_path,
        trainer={"max_epochs": 4},
        study={"n_trials": 1, "baselines": False, "prune_after": prune_after},
    )
    assert tune(config, tmp_path, data_dir, THRESHOLD) == 0
    (trial,) = load(tmp_path).get_trials()
    assert trial.state == TrialState.PRUNED and sorted(trial.intermediate_values) == reported


class ThreadProbe(Callback):
    """Writes the torch threads a trial trains with to ``path`` (one line per run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module):
        with open(self.path, "a") as f:
            f.write(f"{torch.get_num_threads()}\n")


def test_trials_train_with_study_threads(tmp_path, data_dir):
    record = tmp_path / "threads.txt"
    probe = json.dumps(
        [{"class_path": "tests.test_tune_selection.ThreadProbe", "init_args": {"path": str(record)}}]
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        config = write_config(tmp_path, study={"n_trials": 1, "threads": 1})
        assert tune(config, tmp_path, data_dir, f"--trainer.callbacks={probe}") == 0
        assert record.read_text().split() == ["1"]
    finally:
        torch.set_num_threads(before)


def test_threads_default_to_one_or_the_users_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert StudyConfig().torch_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert StudyConfig().torch_threads() == 3
    assert StudyConfig(threads=2).torch_threads() == 2
    with pytest.raises(
        DropoutConfigError, match=r"`study.threads` must be an integer >= 1 or null, but got threads=0"
    ):
        StudyConfig(threads=0)
    with pytest.raises(DropoutConfigError, match=r"`study.prune_after` must satisfy 0 <= prune_after <= 1"):
        StudyConfig(prune_after=1.5)
