"""A study logs through the config's own `trainer.logger`: each trial and re-run under its own identity, with the
study's record (plan columns, state, best value) through `log_hyperparams`/`log_metrics`; TensorBoard only when
the config names no logger; `false` logs nothing."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import yaml
from studies import load, tune, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def logger_arg(class_path: str, **init_args: object) -> str:
    return "--trainer.logger=" + json.dumps({"class_path": class_path, "init_args": init_args})


def test_a_study_logs_each_run_to_the_configs_csv_logger(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 2, "seeds": 2, "top_k": 1})
    save_dir = tmp_path / "csv"
    assert (
        tune(
            config,
            tmp_path,
            data_dir,
            logger_arg("lightning.pytorch.loggers.CSVLogger", save_dir=str(save_dir)),
        )
        == 0
    )

    runs = save_dir / "s" / "trials"
    # each trial, and each re-run of the candidates (top_k=1 plus no dropout) over 2 seeds, is its own run;
    # re-runs in their own folder
    assert sorted(p.name for p in runs.iterdir()) == ["trial_0000", "trial_0001"]
    reruns = sorted(p.name for p in (save_dir / "s" / "reruns").iterdir())
    assert len(reruns) >= 2 and all(n.endswith(("_seed0", "_seed1")) for n in reruns), reruns
    study = load(tmp_path)
    for trial in study.get_trials():
        run = runs / f"trial_{trial.number:04d}"
        hparams = yaml.safe_load((run / "hparams.yaml").read_text())
        assert hparams["study/trial"] == trial.number and hparams["study/kind"] == "trial"
        assert hparams["study/state"] == "complete"
        assert "study/dropout/linear1.output/variant" in hparams  # the plan's site columns
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        values = [float(r["hp/value"]) for r in rows if r.get("hp/value")]
        assert values == [pytest.approx(trial.value)]
        assert any(r.get("val_acc") for r in rows)  # the run's own curves went there too
    # nothing in TensorBoard: the config named its logger
    assert not (tmp_path / "runs" / "s" / "trials").exists()


def test_logger_false_logs_nothing_and_the_study_still_runs(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 1})
    assert tune(config, tmp_path, data_dir, "--trainer.logger=false") == 0
    assert [t.state.name for t in load(tmp_path).get_trials()] == ["COMPLETE"]
    assert not (tmp_path / "runs" / "s" / "trials").exists()


def test_a_study_logs_to_mlflow(tmp_path, data_dir, monkeypatch):
    """Each trial and re-run is an MLflow run tagged with its study, trial and kind, a child of the study's
    parent run, which holds the study's summary (report, comparison table, winning plan) as artifacts; no
    logged key holds the plan key's `:`, so Lightning's MLFlowLogger rewrites and warns about none."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's local file store, no server
    uri = f"file:{tmp_path / 'mlruns'}"
    config = write_config(tmp_path, study={"n_trials": 2, "seeds": 2, "top_k": 1})
    arg = logger_arg("lightning.pytorch.loggers.MLFlowLogger", experiment_name="dropout", tracking_uri=uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tune(config, tmp_path, data_dir, arg) == 0
    assert not [str(w.message) for w in caught if "MLFlow only allows" in str(w.message)]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dropout")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    study = load(tmp_path)
    parent = runs.pop("s study")
    assert parent.data.tags["study"] == "s" and parent.data.tags["kind"] == "study"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["winner"] and parent.data.tags["winner_trial"].isdigit()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "results.md", "best_plan.yaml"} <= artifacts
    local = client.download_artifacts(parent.info.run_id, "results.md", str(tmp_path))
    assert "Winner: **" in Path(local).read_text()
    assert study.user_attrs["logger_parent_runs"] == {"0": parent.info.run_id}  # found again on resume
    trials = {n for n in runs if n.startswith("s trial_")}
    assert trials == {"s trial_0000", "s trial_0001"}
    assert any(n.startswith("s rerun_") for n in runs)
    for name, run in runs.items():
        tags = run.data.tags
        assert tags["study"] == "s" and tags["mlflow.parentRunId"] == parent.info.run_id, name
        assert tags["kind"] == ("rerun" if name.startswith("s rerun_") else "trial"), name
        assert not [k for k in (*run.data.metrics, *run.data.params) if ":" in k], name
    for trial in study.get_trials():
        run = runs[f"s trial_{trial.number:04d}"]
        assert run.data.tags["trial"] == str(trial.number)
        assert run.data.params["study/state"] == "complete"
        assert run.data.params["study/trial"] == str(trial.number)
        assert run.data.metrics["hp/value"] == pytest.approx(trial.value)
        assert "val_acc" in run.data.metrics
    sampled = runs["s trial_0001"].data
    assert "dropout/rate/linear1.output" in sampled.metrics  # the site's rate, under its own name
    assert "study/dropout/linear1.output/variant" in sampled.params


def test_a_logger_without_a_run_identity_fails_before_trial_0(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, study={"n_trials": 1})
    assert tune(config, tmp_path, data_dir, logger_arg("test_tune_loggers.NamelessLogger")) == 2
    err = capsys.readouterr().err
    assert "test_tune_loggers.NamelessLogger takes none of `version`, `run_name` or `name`" in err
    assert not (tmp_path / "runs" / "s" / "study.db").exists()  # refused before the study was opened


from lightning.pytorch.loggers import Logger  # noqa: E402  (the class the last test names)


class NamelessLogger(Logger):
    def __init__(self) -> None:
        super().__init__()

    @property
    def name(self) -> str:
        return "nameless"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_each_logger_gets_the_runs_identity_and_its_study_trial_and_kind():
    """Unit level, no run started: W&B groups a study's runs (`group`) by kind (`job_type`); loggers with a
    `version` put re-runs in their own folder; MLflow tags every run and names the parent run."""
    from lightning_dropout.tune.loggers import _with_identity

    wandb = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "p"}}
    _, args = _with_identity(wandb, "s", "rerun_0001_seed0", "rerun", 1)
    assert args == {"project": "p", "name": "s rerun_0001_seed0", "group": "s", "job_type": "rerun"}
    csv_spec = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs"}}
    _, args = _with_identity(csv_spec, "s", "rerun_0001_seed0", "rerun", 1)
    assert args == {"save_dir": "logs", "version": "rerun_0001_seed0", "name": "s/reruns"}
    mlflow = {
        "class_path": "lightning.pytorch.loggers.MLFlowLogger",
        "init_args": {"tags": {"team": "a"}},
        "parent_run_id": "abc",
    }
    _, args = _with_identity(mlflow, "s", "trial_0002", "trial", 2)
    assert args["run_name"] == "s trial_0002"
    assert args["tags"] == {
        "team": "a",
        "study": "s",
        "trial": "2",
        "kind": "trial",
        "mlflow.parentRunId": "abc",
    }
