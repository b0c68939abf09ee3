"""Studies as Optuna users know them: the objective named after the metric, attributes Optuna's own tools read
(optuna-dashboard opens the storage), samplers and pruners given LightningCLI-style (a user's own class too),
`best`/`report` from the tuning config, and a clear error for a study that is not there."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from studies import write_config

from lightning_dropout.cli import main
from lightning_dropout.tune import open_study

pytestmark = pytest.mark.usefixtures("one_thread")

_USER_CLASSES = '''
import optuna

SAMPLED = []


class RecordingSampler(optuna.samplers.RandomSampler):
    """A user's own sampler: random, recording every parameter it samples."""

    def sample_independent(self, study, trial, param_name, param_distribution):
        SAMPLED.append(param_name)
        return super().sample_independent(study, trial, param_name, param_distribution)


class NeverPruner(optuna.pruners.BasePruner):
    def __init__(self, note: str = "") -> None:
        self.note = note

    def prune(self, study, trial):
        return False
'''


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """One tiny study run through `tune` with a user's own sampler and pruner (by class_path); its config
    names the run directory, so `best`/`report` can find the storage from the config alone."""
    root = tmp_path_factory.mktemp("native")
    (root / "userpkg").mkdir()
    (root / "userpkg" / "__init__.py").write_text(_USER_CLASSES)
    sys.path.insert(0, str(root))
    try:
        config = write_config(
            root,
            study={
                "name": "native",
                "n_trials": 3,
                "run_dir": str(root / "runs"),
                "sampler": {"class_path": "userpkg.RecordingSampler"},
                "pruner": {"class_path": "userpkg.NeverPruner", "init_args": {"note": "mine"}},
            },
        )
        rc = main(["tune", str(config), f"--data.init_args.cache_dir={data_dir}"])
        import userpkg  # type: ignore[import-not-found]

        sampled = list(userpkg.SAMPLED)
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("userpkg", None)
    assert rc == 0
    storage = f"sqlite:///{root / 'runs' / 'native' / 'study.db'}"
    return {"root": root, "config": config, "storage": storage, "sampled": sampled}


def test_a_users_own_sampler_and_pruner_are_used_by_class_path(finished):
    assert finished["sampled"]  # the sampled trial (after the baseline) came from the user's class
    assert all(name.startswith("hidden/") for name in finished["sampled"])


def test_the_objective_is_named_after_the_metric(finished):
    study = open_study("native", finished["storage"])
    assert study.metric_names == ["val_acc"]


def test_every_attribute_is_strict_json(finished):
    storage = optuna.storages.RDBStorage(finished["storage"])
    (frozen,) = storage.get_all_studies()

    def strict(value: Any) -> None:
        json.dumps(value, allow_nan=False)

    strict(frozen.user_attrs)
    strict(frozen.system_attrs)
    assert frozen.system_attrs["study:metric_names"] == ["val_acc"]  # where Optuna keeps the name
    for trial in storage.get_all_trials(storage.get_study_id_from_name("native")):
        strict(trial.user_attrs)
        strict(trial.system_attrs)


def _dashboard_get(app: Any, path: str) -> Any:
    """GET ``path`` from optuna-dashboard's WSGI app; the body parsed as strict JSON."""
    status: list[str] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "8080",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
    }
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status and status[0].startswith("200"), (status, body[:500])

    def no_nan(constant: str) -> Any:
        raise AssertionError(f"optuna-dashboard answered non-JSON {constant} for {path}")

    return json.loads(body, parse_constant=no_nan)


def test_optuna_dashboard_opens_the_storage(finished):
    dashboard = pytest.importorskip("optuna_dashboard")
    app = dashboard.wsgi(optuna.storages.RDBStorage(finished["storage"]))
    studies = _dashboard_get(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["native"]
    detail = _dashboard_get(app, f"/api/studies/{studies[0]['study_id']}")
    assert detail["objective_names"] == ["val_acc"]
    assert detail["directions"] == ["maximize"]
    study = open_study("native", finished["storage"])
    assert len(detail["trials"]) == len(study.trials) == 3
    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert len(complete) == len(study.get_trials(states=(TrialState.COMPLETE,)))
    keys = {a["key"] for t in detail["trials"] for a in t["user_attrs"]}
    assert {"plan", "metrics"} <= keys  # our records, readable there too


@pytest.mark.parametrize("form", ["positional", "--config"])
def test_best_and_report_take_the_tuning_config(finished, form, capsys, tmp_path):
    config = str(finished["config"])
    args = [config] if form == "positional" else ["--config", config]
    assert main(["best", *args, "--out", str(tmp_path / "plan.yaml")]) == 0
    assert capsys.readouterr().out.startswith("# best plan of native: ")
    assert (tmp_path / "plan.yaml").is_file()
    assert main(["report", *args, "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()


def test_report_from_the_config_writes_into_its_run_dir(finished, capsys):
    assert main(["report", str(finished["config"])]) == 0
    assert (finished["root"] / "runs" / "native" / "report.html").is_file()


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-dropout:")]
    assert len(err) == 1, err
    return err[0]


def test_a_study_name_that_is_not_there_lists_the_names(finished, capsys):
    assert main(["best", "nativ", "--storage", finished["storage"]]) == 2
    line = _one_error(capsys)
    assert "'nativ'" in line and "['native']" in line


@pytest.mark.parametrize("scheme", ["sqlite", "journal"])
@pytest.mark.parametrize("command", ["best", "report"])
def test_a_storage_that_is_not_there_is_never_created(tmp_path, capsys, scheme, command):
    missing = tmp_path / "nowhere" / "study.db"
    url = f"sqlite:///{missing}" if scheme == "sqlite" else f"journal:{missing}"
    assert main([command, "s", "--storage", url]) == 2
    line = _one_error(capsys)
    assert "does not exist" in line and "'s'" in line
    assert not missing.exists() and not missing.parent.exists()


def test_a_default_storage_that_is_not_there_is_never_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["best", "typo"]) == 2
    assert "does not exist" in _one_error(capsys)
    assert list(tmp_path.iterdir()) == []  # no runs/typo/study.db, no runs/


def test_the_former_sampler_form_names_its_rewrite(tmp_path, data_dir, capsys):
    config = write_config(
        tmp_path, study={"sampler": {"name": "TPESampler", "args": {"multivariate": True, "group": True}}}
    )
    assert main(["tune", str(config), f"--study.run_dir={tmp_path / 'runs'}"]) == 2
    line = _one_error(capsys)
    assert "class_path: optuna.samplers.TPESampler" in line and "init_args" in line
    assert not (tmp_path / "runs").exists()


def test_a_users_sampler_class_that_is_not_a_sampler_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "notasampler.py").write_text(textwrap.dedent("class Thing:\n    pass\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = write_config(tmp_path, study={"sampler": {"class_path": "notasampler.Thing"}})
    assert main(["tune", str(config), f"--study.run_dir={tmp_path / 'runs'}"]) == 2
    line = _one_error(capsys)
    assert "`study.sampler.class_path`" in line and "notasampler.Thing" in line and "BaseSampler" in line


def test_tune_study_takes_a_study_config_with_a_class_path_sampler(tmp_path, data_dir):
    from lightning_dropout.data import MNIST1DDataModule
    from lightning_dropout.tune import SearchGroup, StudyConfig, tune_study
    from lightning_dropout.zoo import MLP

    study = StudyConfig(
        name="api",
        metric="val_acc",
        direction="maximize",
        n_trials=1,
        seeds=0,
        warm_start=False,
        run_dir=str(tmp_path / "runs"),
        sampler={"class_path": "optuna.samplers.RandomSampler"},
        pruner=None,
    )
    result = tune_study(
        MLP,
        MNIST1DDataModule,
        model_args={"hidden": 16},
        data_args={"batch_size": 50, "num_samples": 500, "cache_dir": str(data_dir)},
        trainer={"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "accelerator": "cpu"},
        dropout=[SearchGroup("hidden", {"match": "Linear"})],
        study=study,
    )
    written = result.config_path.read_text()
    assert "class_path: optuna.samplers.RandomSampler" in written and "pruner: null" in written
    assert result.study.metric_names == ["val_acc"]
