"""A study logs through the config's own `trainer.logger`: each trial and re-run under its own identity, with the
study's record (plan columns, state, best value) through `log_hyperparams`/`log_metrics`; TensorBoard only when
the config names no logger; `false` logs nothing."""

from __future__ import annotations

import csv
import json

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
    # each trial, and each re-run of the candidates (top_k=1 plus no dropout) over 2 seeds, is its own run
    names = sorted(p.name for p in runs.iterdir())
    assert [n for n in names if n.startswith("trial_")] == ["trial_0000", "trial_0001"]
    reruns = [n for n in names if n.startswith("rerun_")]
    assert len(reruns) >= 2 and all(n.endswith(("_seed0", "_seed1")) for n in reruns), names
    study = load(tmp_path)
    for trial in study.get_trials():
        run = runs / f"trial_{trial.number:04d}"
        hparams = yaml.safe_load((run / "hparams.yaml").read_text())
        assert hparams["study/trial"] == trial.number and hparams["study/kind"] == "trial"
        assert hparams["study/state"] == "complete"
        assert "study/dropout/linear1:output/variant" in hparams  # the plan's site columns
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
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's local file store, no server
    uri = f"file:{tmp_path / 'mlruns'}"
    config = write_config(tmp_path, study={"n_trials": 2})
    arg = logger_arg("lightning.pytorch.loggers.MLFlowLogger", experiment_name="dropout", tracking_uri=uri)
    assert tune(config, tmp_path, data_dir, arg) == 0

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dropout")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"s trial_0000", "s trial_0001"}
    for trial in load(tmp_path).get_trials():
        run = runs[f"s trial_{trial.number:04d}"]
        assert run.data.params["study/state"] == "complete"
        assert run.data.params["study/trial"] == str(trial.number)
        assert run.data.metrics["hp/value"] == pytest.approx(trial.value)
        assert "val_acc" in run.data.metrics


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
