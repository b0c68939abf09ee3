"""What a study shows in TensorBoard and in `lightning-dropout report`: one run per trial (re-runs under
`reruns/`) with the same HParams keys for every trial (absent sites filled), the best value (not the last), the
gap at the best epoch and the state (pruned and failed trials included); one HParams experiment summary for the
study; the study's figures as images; the static HTML report.

Every assertion reads the event files back with TensorBoard's own reader."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from studies import load, sqlite_url, tune, write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn

from lightning_dropout.cli import main
from lightning_dropout.plan import DropoutPlan, Site
from lightning_dropout.tune.board import display_name, plan_columns, plan_hparams
from lightning_dropout.tune.space import SearchGroup

pytestmark = pytest.mark.usefixtures("one_thread")


class Run:
    """One TensorBoard run directory, read back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.event_files = sorted(path.glob("events.out.tfevents.*"))
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
        acc.Reload()
        self.acc = acc
        self.hparams: dict[str, Any] = {}  # by key: the column's rank prefix (`1 trial`) removed
        self.columns: list[str] = []  # the HParams column names, as written
        self.metric_tags: list[str] = []
        self.experiment: Any = None
        self.session_starts = 0
        try:
            records = acc.PluginTagToContent("hparams")
        except KeyError:  # a run without any HParams record (e.g. the study's images)
            records = {}
        for content in records.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                self.session_starts += 1
                for key, value in data.session_start_info.hparams.items():
                    kind = value.WhichOneof("kind")
                    self.columns.append(key)
                    self.hparams[display_name(key)] = getattr(value, kind)
            if data.HasField("experiment"):
                self.experiment = data.experiment
                self.metric_tags = [m.name.tag for m in data.experiment.metric_infos]

    def scalars(self, tag: str) -> list[float]:
        return [e.value for e in self.acc.Scalars(tag)]

    @property
    def tags(self) -> list[str]:
        return sorted(self.acc.Tags()["scalars"])


# ----------------------------------------------------------------------------------------------------------
# One study shared by the tests below: a baseline, 3 sampled trials, re-runs over 2 seeds
# ----------------------------------------------------------------------------------------------------------
GROUP = {
    "name": "hidden",
    "select": {"match": "Linear"},
    "variants": ["standard", "gaussian"],
    "p": [0.0, 0.5],
    "per_layer": True,
    "params": {"standard": {"scaling": ["inverted", "inference"]}},
}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("board")
    config = write_config(
        tmp,
        dropout={"groups": [GROUP]},
        study={"n_trials": 4, "seeds": 2, "top_k": 1, "gap_samples": 64},
        trainer={"max_epochs": 3},
    )
    assert tune(config, tmp, data_dir) == 0
    return tmp


def best_sampled(study: optuna.Study) -> int:
    """The best trial that is not a baseline (re-run with the baseline)."""
    return max(study.trials[1:], key=lambda t: t.value).number


def trial_runs(study_dir: Path) -> dict[str, Run]:
    """Every trial and re-run, by run name (``trial_0001``, ``rerun_0001_seed0``)."""
    root = study_dir / "runs" / "s"
    return {p.name: Run(p) for folder in ("trials", "reruns") for p in sorted((root / folder).iterdir())}


def test_every_trial_and_rerun_is_one_run_with_one_hparams_record(study_dir):
    root = study_dir / "runs" / "s"
    runs = trial_runs(study_dir)
    best = best_sampled(load(study_dir))
    # re-runs are told apart from trials by their folder
    assert sorted(p.name for p in (root / "trials").iterdir()) == [f"trial_{n:04d}" for n in range(4)]
    assert sorted(p.name for p in (root / "reruns").iterdir()) == sorted(
        f"rerun_{n:04d}_seed{s}" for n in (0, best) for s in (0, 1)
    )
    for name, run in runs.items():
        assert len(run.event_files) == 1, name  # hparams written into the run's own (single) event file
        assert run.session_starts == 1, name  # Lightning's automatic record is folded into ours
        assert run.experiment is None, name  # a run writes no experiment summary: the study writes one
        assert run.hparams["kind"] == ("rerun" if name.startswith("rerun") else "trial")


def test_the_study_writes_one_hparams_experiment_with_differs_and_ordered_columns(study_dir):
    study_run = Run(study_dir / "runs" / "s" / "study")
    experiment = study_run.experiment
    assert experiment is not None
    infos = {h.display_name: h for h in experiment.hparam_infos}
    assert set(infos) == set(next(iter(trial_runs(study_dir).values())).hparams)
    # what varies between the runs is marked, what does not is not
    assert all(infos[k].differs for k in ("trial", "kind", "seed", "baseline", "dropout/linear1.output/p"))
    assert not infos["module/hidden"].differs and not infos["module/lr"].differs
    assert sorted(infos["kind"].domain_discrete) == ["rerun", "trial"]
    assert infos["trial"].domain_interval.min_value == 0 and infos["trial"].domain_interval.max_value == 3
    # TensorBoard lists the varying columns first, sorted by name: the names give trial, kind, the sites, the rest
    assert tensorboard_order(experiment) == ["trial", "kind", *SITE_COLUMNS, "baseline", "seed"]
    assert [m.name.tag for m in experiment.metric_infos] == [
        "hp/best_val_acc",
        "hp/best_epoch",
        "hp/value",
        "hp/gap_at_best/acc",
        "hp/gap_at_best/loss",
    ]


def test_hparams_keys_are_the_same_for_every_trial_and_absent_sites_are_filled(study_dir):
    runs = trial_runs(study_dir)
    keysets = {name: sorted(run.hparams) for name, run in runs.items()}
    first = next(iter(keysets.values()))
    assert all(keys == first for keys in keysets.values())
    site_keys = {k for k in first if k.startswith("dropout/")}
    assert site_keys == {
        f"dropout/{site}/{field}"
        for site in ("linear1.output", "linear2.output")
        for field in ("variant", "p", "scaling")
    }
    assert "module/hidden" in first and "module/lr" in first  # the module's own hparams, once
    baseline = runs["trial_0000"].hparams
    assert baseline["baseline"] == "no dropout"
    assert baseline["dropout/linear1.output/variant"] == "none"
    assert baseline["dropout/linear1.output/p"] == 0.0
    assert baseline["dropout/linear1.output/scaling"] == "-"
    # a sampled trial's record is its stored plan
    study = load(study_dir)
    for trial in study.trials[1:]:
        plan = DropoutPlan.from_yaml(trial.user_attrs["plan"])
        hp = runs[f"trial_{trial.number:04d}"].hparams
        assert hp["trial"] == trial.number and hp["baseline"] == "-"
        sites = {s.key: s for s in plan}
        for key in ("linear1:output", "linear2:output"):
            site = sites.get(key)
            column = f"dropout/{key.replace(':', '.')}"
            assert hp[f"{column}/variant"] == (site.variant if site else "none")
            assert hp[f"{column}/p"] == pytest.approx(site.p if site else 0.0)
            expected = str(site.params["scaling"]) if site and "scaling" in site.params else "-"
            assert hp[f"{column}/scaling"] == expected


SITE_COLUMNS = [f"dropout/linear{i}.output/{f}" for i in (1, 2) for f in ("p", "scaling", "variant")]


def tensorboard_order(experiment: Any) -> list[str]:
    """The varying columns as TensorBoard lists them (differing first, then by name), by display name."""
    return [display_name(n) for n in sorted(h.name for h in experiment.hparam_infos if h.differs)]


def test_experiment_columns_order_trial_kind_state_then_the_sites_then_the_rest(tmp_path):
    """Runs recorded by TrialLogger, one pruned: `state` varies and comes third; a constant column is not marked."""
    from lightning_dropout.tune.board import TrialLogger, write_experiment

    for number, (state, p) in enumerate([("complete", 0.1), ("pruned", 0.3), ("complete", 0.1)]):
        kind = "rerun" if number == 2 else "trial"
        logger = TrialLogger(tmp_path / "s", name=f"{kind}s", version=f"{kind}_{number}")
        record = {"trial": number, "kind": kind, "seed": 0, "state": state, "baseline": "-"}
        logger.finish({**record, "dropout/fc1.output/p": p, "dropout/fc1.output/variant": "standard"}, {})
    assert write_experiment(tmp_path / "s", tmp_path / "s" / "study") == 3
    experiment = Run(tmp_path / "s" / "study").experiment
    assert tensorboard_order(experiment) == ["trial", "kind", "state", "dropout/fc1.output/p"]
    infos = {h.display_name: h for h in experiment.hparam_infos}
    assert not infos["seed"].differs and not infos["dropout/fc1.output/variant"].differs
    assert sorted(infos["state"].domain_discrete) == ["complete", "pruned"]
    assert (
        infos["dropout/fc1.output/p"].domain_interval.min_value,
        infos["dropout/fc1.output/p"].domain_interval.max_value,
    ) == (0.1, 0.3)


def test_hparams_metrics_are_the_best_value_and_the_gap_at_the_best_epoch(study_dir):
    study = load(study_dir)
    for trial in study.trials:
        run = trial_runs(study_dir)[f"trial_{trial.number:04d}"]
        assert run.hparams["state"] == "complete"
        val = run.scalars("val_acc")
        assert len(val) == 3
        (best,) = run.scalars("hp/best_val_acc")
        assert best == pytest.approx(max(val)) == pytest.approx(trial.value)
        assert run.scalars("hp/value")[0] == pytest.approx(trial.value)  # `study.value: best` here
        epoch = int(run.scalars("hp/best_epoch")[0])
        assert val[epoch] == pytest.approx(max(val))
        gaps = run.scalars("gap/acc")
        assert run.scalars("hp/gap_at_best/acc")[0] == pytest.approx(gaps[epoch])
        # the gap is validation minus the clean training figure, logged next to it
        clean = run.scalars("train_clean/acc")
        assert gaps[epoch] == pytest.approx(val[epoch] - clean[epoch], abs=1e-6)
        assert {"train_dropout/acc", "train_dropout/loss", "gap/loss", "train_clean/loss"} <= set(run.tags)
        # stored on the trial too, for `report`
        metrics = trial.user_attrs["metrics"]
        assert metrics["gap_at_best/acc"] == pytest.approx(gaps[epoch])
        assert metrics["best_value"] == pytest.approx(best)


def test_study_figures_are_tensorboard_images(study_dir):
    run = Run(study_dir / "runs" / "s" / "study")
    images = set(run.acc.Tags()["images"])
    assert {
        "study/optimization_history",
        "study/intermediate_values",
        "study/best_rates",
        "study/gap_vs_value",
        "study/param_importances",
    } <= images
    for tag in images:
        (image,) = run.acc.Images(tag)
        assert image.width > 200 and image.height > 200
    assert "study/results/text_summary" in run.acc.Tags()["tensors"]


def test_report_writes_a_self_contained_html_page(study_dir, capsys):
    out = study_dir / "report" / "study.html"
    assert main(["report", "s", "--storage", sqlite_url(study_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    study = load(study_dir)
    reruns = study.user_attrs["reruns"]
    assert set(reruns) == {"0", str(best_sampled(study))}
    # the baselines table: every re-run with its mean and values
    for info in reruns.values():
        values = info["values"]
        assert info["label"] in page
        assert f"{sum(values) / len(values):.4f}" in page
    assert "Best plan" in page and "no dropout" in page
    # figures are embedded PNGs: the page needs no server and no other file
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 5
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "src='http" not in page and 'src="http' not in page
    # every trial is listed with its state
    assert page.count("<td>complete</td>") == len(study.trials)


def test_report_labels_the_trial_value_and_the_best_epoch_and_skips_an_empty_best_rates_figure(tmp_path):
    """A study whose value is the `ema` of the curve (0.86) and whose best epoch reached 0.97, won by no dropout:
    both values are shown, each labelled, and "best rates" (nothing to draw) is left out with the reason."""
    from optuna.distributions import FloatDistribution

    from lightning_dropout.tune.report import study_figures, write_report

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("metric", "val_acc")
    study.set_user_attr("value", "ema")
    for value, best, plan, baseline in (
        (0.86, 0.97, DropoutPlan(), {"baseline": "no dropout"}),
        (0.80, 0.90, DropoutPlan([Site("fc1", "output", "standard", 0.3)]), {}),
    ):
        attrs = {"plan": plan.to_yaml(), "metrics": {"best_value": best, "best_epoch": 4.0, "value": value}}
        study.add_trial(
            optuna.trial.create_trial(
                value=value,
                params={"x": 0.5},
                distributions={"x": FloatDistribution(0, 1)},
                user_attrs={**attrs, **baseline},
                intermediate_values={0: best - 0.1, 1: best},
            )
        )
    figures, skipped = study_figures(study)
    assert "best_rates" not in figures
    assert skipped["best_rates"] == "the winner, no dropout, has no dropout site: no rate to draw"
    page = write_report(study, tmp_path / "r.html").read_text()
    assert "<th>val_acc: trial value (ema)</th><th>val_acc at the best epoch</th><th>best epoch</th>" in page
    assert "<td>0.8600</td><td>0.9700</td><td>4</td>" in page  # the same trial's two values, in their columns
    assert "best rates: not drawn (the winner, no dropout, has no dropout site: no rate to draw)" in page
    history = figures["optimization_history"].axes[0]
    assert history.get_ylabel() == "val_acc: trial value (ema)"


def test_report_of_an_unknown_study_is_one_line_exit_2(study_dir, capsys):
    assert main(["report", "nope", "--storage", sqlite_url(study_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "['s']" in err[0]


# ----------------------------------------------------------------------------------------------------------
# Pruned and failed trials get a row too
# ----------------------------------------------------------------------------------------------------------
def test_pruned_trials_have_a_run_with_state_pruned_and_their_best_value(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 2, "baselines": False})  # baselines are never pruned
    pruner = '--study.pruner={"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 0.99, "n_warmup_steps": 1}}'
    assert tune(config, tmp_path, data_dir, pruner) == 0
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for trial in study.trials:
        run = Run(tmp_path / "runs" / "s" / "trials" / f"trial_{trial.number:04d}")
        assert run.hparams["state"] == "pruned"
        assert run.scalars("hp/best_val_acc")[0] == pytest.approx(max(trial.intermediate_values.values()))
    # the study images exist even though no trial completed
    images = set(Run(tmp_path / "runs" / "s" / "study").acc.Tags()["images"])
    assert "study/intermediate_values" in images


def test_failed_trials_have_a_run_with_state_failed(tmp_path, data_dir):
    config = write_config(
        tmp_path,
        model={"init_args": {"hidden": 16, "lr": 1e30}},
        study={"metric": "val_loss", "direction": "minimize", "n_trials": 1},
    )
    assert tune(config, tmp_path, data_dir) == 2  # no trial completed: not a success
    (trial,) = load(tmp_path).trials
    assert trial.state == TrialState.FAIL
    run = Run(tmp_path / "runs" / "s" / "trials" / "trial_0000")
    assert run.hparams["state"] == "failed"
    assert math.isnan(run.scalars("hp/best_val_loss")[0])


def test_gap_samples_zero_drops_the_monitor_and_its_columns(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 1, "gap_samples": 0})
    assert tune(config, tmp_path, data_dir) == 0
    run = Run(tmp_path / "runs" / "s" / "trials" / "trial_0000")
    study_run = Run(tmp_path / "runs" / "s" / "study")
    assert study_run.metric_tags == ["hp/best_val_acc", "hp/best_epoch", "hp/value"]
    assert not [t for t in run.tags if t.startswith(("gap/", "train_clean/"))]


def test_a_searched_choice_that_is_no_sites_own_has_its_hparams_column(tmp_path, data_dir):
    group = {**GROUP, "per_layer": False, "params": {}, "depth_scaling": ["none", "linear"]}
    config = write_config(tmp_path, dropout={"groups": [group]}, study={"n_trials": 3, "gap_samples": 0})
    assert tune(config, tmp_path, data_dir) == 0
    study = load(tmp_path)
    for trial in study.trials:
        hp = Run(tmp_path / "runs" / "s" / "trials" / f"trial_{trial.number:04d}").hparams
        assert hp["dropout/hidden/depth_scaling"] == trial.params.get("hidden/depth_scaling", "-")
    assert study.trials[0].user_attrs["baseline"] and "hidden/depth_scaling" in study.trials[1].params
    experiment = Run(tmp_path / "runs" / "s" / "study").experiment
    assert "dropout/hidden/depth_scaling" in {display_name(h.name) for h in experiment.hparam_infos}


def test_mc_samples_logs_calibration_and_entropy(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 1, "mc_samples": 3, "baselines": False})
    assert tune(config, tmp_path, data_dir) == 0
    run = Run(tmp_path / "runs" / "s" / "trials" / "trial_0000")
    for tag in ("mc/ece", "mc/ece_no_dropout", "mc/entropy", "mc/accuracy"):
        values = run.scalars(tag)
        assert len(values) == 2 and all(0.0 <= v <= math.log(10) + 1e-6 for v in values)


# ----------------------------------------------------------------------------------------------------------
# The padded key set, unit level
# ----------------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc2(self.fc1(x)))


def test_plan_columns_cover_every_variant_of_a_group():
    group = SearchGroup(
        name="g",
        select={"match": "Linear"},
        variants=["standard", "weight", "dropblock"],
        params={"dropblock": {"block_size": [1, 3]}},
    )
    columns = plan_columns([group], Net(), torch.zeros(2, 4))
    # DropConnect sites sit on the weight, the others on the output; the output layer is excluded
    assert columns == {
        "fc1:output": ["block_size"],
        "fc2:output": ["block_size"],
        "fc1:weight": [],
        "fc2:weight": [],
    }
    hp = plan_hparams(DropoutPlan([Site("fc1", "weight", "weight", 0.3)]), columns)
    assert hp["dropout/fc1.weight/variant"] == "weight" and hp["dropout/fc1.weight/p"] == 0.3
    assert hp["dropout/fc2.output/variant"] == "none" and hp["dropout/fc2.output/block_size"] == "-"
    assert len(hp) == 2 * 4 + 2


def test_trial_logger_folds_lightning_hparams_into_one_record(tmp_path):
    from lightning_dropout.tune.board import TrialLogger

    logger = TrialLogger(tmp_path, name="t", version="v")
    logger.log_hyperparams({"lr": 0.1, "nested": {"a": 1}, "_private": "x", "none": None})
    logger.finalize("success")  # deferred: nothing closed yet
    logger.finish({"kind": "trial"}, {"hp/x": 1.0, "hp/y": None})  # type: ignore[dict-item]
    run = Run(tmp_path / "t" / "v")
    assert run.session_starts == 1
    assert run.hparams == {"module/lr": 0.1, "module/nested/a": 1.0, "kind": "trial"}
    assert sorted(run.columns) == ["2 kind", "5 module/lr", "5 module/nested/a"]  # ranked: TensorBoard sorts
    assert run.scalars("hp/x") == [1.0] and math.isnan(run.scalars("hp/y")[0])
    assert len(run.event_files) == 1
