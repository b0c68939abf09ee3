"""What `tune` says and records beyond its table: one line per finished trial, an ETA, "re-run K of N"; the
winner in Optuna's own terms (study attributes and optuna-dashboard's study note); the config readable per
section; uniform plans in one line; a report command that can be pasted; the storage URL from
``$LIGHTNING_DROPOUT_STORAGE``."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console
from rich.progress import Progress
from studies import BASE, tune, write_config

from lightning_dropout.cli import main
from lightning_dropout.plan import DropoutPlan, Site
from lightning_dropout.tune import open_study
from lightning_dropout.tune.config import STORAGE_ENV, StudyConfig, resolve_storage
from lightning_dropout.tune.records import (
    CONFIG_ATTR,
    FAIL_ATTR,
    PLAN_ATTR,
    rerun_candidates,
    winner,
    winner_trial,
)
from lightning_dropout.tune.report import output_console, plan_summary
from lightning_dropout.tune.selection import Candidate
from lightning_dropout.tune.study import (
    TimeLeftColumn,
    rerun_status,
    results_table,
    study_command,
    trial_line,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = {"name": "out", "n_trials": 3, "seeds": 2, "top_k": 1}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """A tiny study with re-runs over 2 seeds, its storage given only by ``$LIGHTNING_DROPOUT_STORAGE``; its
    config names the run directory, so the config alone locates the study."""
    root = tmp_path_factory.mktemp("output")
    storage = f"sqlite:///{root / 'elsewhere' / 'study.db'}"
    config = write_config(
        root,
        study={**STUDY, "run_dir": str(root / "runs")},
        data={"init_args": {**BASE["data"]["init_args"], "cache_dir": str(data_dir)}},
    )
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as env,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        env.setenv(STORAGE_ENV, storage)
        rc = main(["tune", str(config)])
    assert rc == 0, err.getvalue()[-2000:]
    return {"root": root, "config": config, "storage": storage, "out": out.getvalue(), "err": err.getvalue()}


# -- the storage URL from the environment --------------------------------------------------------------------


def test_tune_opens_the_storage_the_environment_names(finished):
    assert (finished["root"] / "elsewhere" / "study.db").is_file()
    assert not (finished["root"] / "runs" / "out" / "study.db").exists()  # not the default SQLite file
    assert f"study out in {finished['storage']}" in " ".join(finished["err"].split())


def test_best_and_report_take_the_storage_from_the_environment(finished, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(STORAGE_ENV, finished["storage"])
    assert main(["best", "out", "--out", str(tmp_path / "plan.yaml")]) == 0  # the name alone
    assert capsys.readouterr().out.startswith("# best plan of out: ")
    assert main(["report", str(finished["config"]), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()
    monkeypatch.delenv(STORAGE_ENV)  # without it the same command looks in the default file: not there
    assert main(["best", "out"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_storage_precedence_is_command_line_config_environment_default(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert resolve_storage(None, "s", "runs") == "sqlite:///runs/s/study.db"
    monkeypatch.setenv(STORAGE_ENV, "journal:from-env.log")
    assert resolve_storage(None, "s", "runs") == "journal:from-env.log"
    assert StudyConfig(name="s").storage_url() == "journal:from-env.log"
    assert StudyConfig(name="s", storage="journal:from-config.log").storage_url() == "journal:from-config.log"
    monkeypatch.setenv(STORAGE_ENV, "")  # set but empty: as unset
    assert StudyConfig(name="s", run_dir="r").storage_url() == "sqlite:///r/s/study.db"
    # the command line over the config, for `best`: --storage wins over the config's study.storage
    config = write_config(tmp_path, study={"name": "s", "storage": f"journal:{tmp_path / 'config.log'}"})
    monkeypatch.setenv(STORAGE_ENV, f"journal:{tmp_path / 'env.log'}")
    assert main(["best", str(config), "--storage", f"journal:{tmp_path / 'cli.log'}"]) == 2
    assert "cli.log" in capsys.readouterr().err  # refused: no study there, and nothing created
    assert main(["best", str(config)]) == 2
    assert "config.log" in capsys.readouterr().err
    assert not (tmp_path / "config.log").exists() and not (tmp_path / "env.log").exists()


# -- the winner in Optuna's terms -------------------------------------------------------------------------------


def test_the_winner_is_recorded_in_study_attributes(finished):
    study = open_study("out", finished["storage"])
    attrs = study.user_attrs
    chosen = winner_trial(study)
    assert attrs["winner_trial"] == chosen.number
    assert attrs["winner_label"] == winner(study)[1]
    (candidate,) = [c for c in rerun_candidates(study) if c.trial == chosen.number]
    assert attrs["winner_values"] == pytest.approx(candidate.values) and len(attrs["winner_values"]) == 2


def test_optuna_dashboard_shows_a_note_on_the_winner(finished):
    dashboard = pytest.importorskip("optuna_dashboard")
    study = open_study("out", finished["storage"])
    note = dashboard.get_note(study)
    number = study.user_attrs["winner_trial"]
    assert f"## Winner: trial {number}, " in note
    assert f"Best Trial** is the best *single* run: trial {study.best_trial.number}" in note
    assert "one_se" in note and "2 seeds" in note
    # the dashboard's own server answers it with the study
    app = dashboard.wsgi(optuna.storages.RDBStorage(finished["storage"]))
    status: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/api/studies/{study._study_id}", "QUERY_STRING": ""}
    environ.update({"SERVER_NAME": "localhost", "SERVER_PORT": "8080", "wsgi.url_scheme": "http"})
    environ.update({"wsgi.input": io.BytesIO(), "wsgi.errors": io.StringIO()})
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200")
    import json

    detail = json.loads(body)
    assert detail["note"]["body"] == note
    assert {a["key"] for a in detail["user_attrs"]} >= {"winner_trial", "winner_label", "winner_values"}


def test_a_note_written_by_hand_is_kept(tmp_path):
    dashboard = pytest.importorskip("optuna_dashboard")
    from lightning_dropout.tune.records import record_winner

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db'}", direction="maximize")
    study.add_trial(create_trial(value=0.5, user_attrs={PLAN_ATTR: "sites: []"}))
    dashboard.save_note(study, "my own notes")
    assert record_winner(study).number == 0
    assert dashboard.get_note(study) == "my own notes"
    assert study.user_attrs["winner_values"] == [0.5]  # no re-runs: the single trial value


# -- the config, readable -------------------------------------------------------------------------------------


def test_the_config_is_stored_readably_per_section(finished):
    attrs = open_study("out", finished["storage"]).user_attrs
    assert attrs["config/model"] == "lightning_dropout.zoo.MLP(hidden=16, lr=0.01, weight_decay=0.0)"
    trainer = attrs["config/trainer"]
    assert "max_epochs=2" in trainer and "limit_train_batches=3" in trainer
    assert "fast_dev_run" not in trainer  # left at its default: not repeated
    assert attrs["config/data"].startswith("lightning_dropout.data.MNIST1DDataModule(batch_size=50, ")
    assert "n_trials=3" in attrs["config/study"] and "seeds=2" in attrs["config/study"]
    assert "name: hidden" in attrs["config/dropout"]
    assert all(len(v) <= 1000 for k, v in attrs.items() if k.startswith("config/"))
    # the whole config stays, for `best --config-out`
    assert yaml.safe_load(attrs[CONFIG_ATTR])["study"]["name"] == "out"


# -- progress and output --------------------------------------------------------------------------------------


def test_each_finished_trial_gets_one_line(finished):
    lines = [line for line in finished["err"].splitlines() if re.match(r"trial \d+ ", line)]
    assert len(lines) == 3, finished["err"]
    assert lines[0].startswith("trial 0 (no dropout)  val_acc 0.") and lines[0].endswith("(no sites)")
    assert all("(best epoch)" in line for line in lines)  # the value is labelled (study.value: best)


def test_in_a_log_the_results_are_not_wrapped_at_80_columns(finished, monkeypatch):
    # stdout and stderr were files: Rich would have drawn 80 columns and cut these lines in two
    compute = [line for line in finished["out"].splitlines() if line.startswith("compute: used")]
    assert len(compute) == 1 and compute[0].endswith(" epochs)"), finished["out"]
    header = finished["err"].splitlines()[0]
    assert header.startswith("study ") and header.endswith(" worker(s)"), finished["err"]
    monkeypatch.delenv("COLUMNS", raising=False)
    assert output_console().width == 120 and output_console(stderr=True).width == 120
    monkeypatch.setenv("COLUMNS", "100")  # the user's choice wins
    assert output_console().width == 100


def test_a_failed_trial_is_told_once(tmp_path, data_dir, capsys, caplog):
    config = write_config(tmp_path, study={"n_trials": 1, "seeds": 0}, model={"init_args": {"lr": 1e30}})
    with caplog.at_level("WARNING"):
        assert tune(config, tmp_path, data_dir) == 2  # no trial completed: not a success
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trial 0")]
    assert len(lines) == 1 and "failed: " in lines[0] and "diverged" in lines[0], lines
    assert not [r for r in caplog.records if r.getMessage().startswith("trial 0 failed")]  # not logged again


def _site(target: str, p: float = 0.1, variant: str = "standard") -> Site:
    return Site(target, "output", variant, p)


def _trial(state: TrialState, **attrs: Any) -> optuna.trial.FrozenTrial:
    values = {0: 0.41, 1: 0.52} if state == TrialState.PRUNED else {}
    trial = create_trial(
        state=state,
        value=0.8765 if state == TrialState.COMPLETE else None,
        params={"x": 0.1},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs=attrs,
        intermediate_values=values,
    )
    trial.number = 0
    return trial


def test_the_trial_line_says_pruned_at_which_epoch_or_why_it_failed():
    plan = DropoutPlan([_site(f"blocks.{i}") for i in range(8)]).to_yaml()
    complete = _trial(TrialState.COMPLETE, plan=plan, search={"model.init_args.lr": 0.00123})
    assert trial_line(complete, "val_acc", "ema") == (
        "trial 0  val_acc 0.8765 (ema of the curve)  8 sites standard 0.10  lr=0.00123"
    )
    assert trial_line(_trial(TrialState.PRUNED, plan=plan), "val_acc").startswith(
        "trial 0  pruned at epoch 1 (val_acc 0.5200)  8 sites"
    )
    failed = _trial(TrialState.FAIL, **{FAIL_ATTR: "RuntimeError: postgresql://u:pw@h/db refused\nmore"})
    assert trial_line(failed, "val_acc") == "trial 0  failed: RuntimeError: postgresql://u:***@h/db refused"
    interrupted = _trial(TrialState.FAIL, **{FAIL_ATTR: "interrupted (Ctrl-C)"})
    assert trial_line(interrupted, "val_acc") is None


def test_the_progress_bar_shows_the_time_left_at_this_runs_pace():
    now = [100.0]
    progress = Progress(TimeLeftColumn(), get_time=lambda: now[0], console=Console(file=io.StringIO()))
    task_id = progress.add_task("trials", total=10, completed=2, start_count=2)  # 2 from an earlier run
    column, task = TimeLeftColumn(), progress.tasks[0]
    assert column.render(task).plain == "eta -:--:--"
    now[0] = 130.0
    progress.update(task_id, completed=5)  # 3 trials in 30 s: 5 left take 50 s
    assert column.render(task).plain == "eta 0:00:50"
    progress.update(task_id, completed=10)
    assert column.render(task).plain == ""


def test_the_rerun_status_counts_every_workers_reruns(finished):
    study = open_study("out", finished["storage"])
    cfg = StudyConfig(name="out", **{k: v for k, v in STUDY.items() if k != "name"})
    status = rerun_status(study, cfg, "no dropout seed 2/2")
    assert status == "re-run 4 of 4 done, race round 2 (last: no dropout seed 2/2)"
    study.set_user_attr("reruns", {})  # as if only the workers' own values were stored
    keys = [k for k in study.user_attrs if k.startswith("rerun_value:")]
    assert rerun_status(study, cfg, "x") == f"re-run {len(keys)} of 4 done, race round 2 (last: x)"


# -- plans in tables ------------------------------------------------------------------------------------------


def test_a_uniform_plan_is_one_line():
    uniform = DropoutPlan([_site(f"encoder.layer.{i}.output") for i in range(8)])
    assert plan_summary(uniform) == "8 sites standard 0.10"
    candidate = Candidate("uniform p=0.1", 3, uniform, [0.9, 0.91, 0.92], 0.8, [1, 2, 3])
    buffer = io.StringIO()
    Console(file=buffer, width=80).print(results_table([candidate], "val_acc"))
    lines = buffer.getvalue().splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("┡")) + 1 : -1]
    assert len(body) <= 3, buffer.getvalue()  # the row of 8 sites was 24 lines at 80 columns


def test_a_mixed_plan_groups_runs_of_alike_sites():
    sites = [_site(f"blocks.{i}") for i in range(5)]
    sites += [_site("head", 0.2, "gaussian"), _site("a", 0.3), _site("b", 0.3)]
    assert plan_summary(DropoutPlan(sites)) == (
        "blocks.0 ... blocks.4 (5 sites) standard 0.10; head gaussian 0.20; a, b standard 0.30"
    )
    assert plan_summary(DropoutPlan([_site("fc1", 0.25)])) == "fc1 standard 0.25"
    assert plan_summary(DropoutPlan()) == "(no sites)"
    assert plan_summary(DropoutPlan(sites), sep="\n").count("\n") == 2


# -- hints that can be pasted ---------------------------------------------------------------------------------


def test_the_printed_report_command_runs_as_printed(finished, monkeypatch, tmp_path):
    (hint,) = re.findall(r"HTML report: (lightning-dropout report \S+)", " ".join(finished["out"].split()))
    assert hint == f"lightning-dropout report {shlex.quote(str(finished['config']))}"
    monkeypatch.setenv(STORAGE_ENV, finished["storage"])  # the same shell as `tune`
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(hint)[1:]) == 0
    assert (finished["root"] / "runs" / "out" / "report.html").is_file()


def test_a_storage_url_with_a_password_is_never_in_a_hint(tmp_path, monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    config = write_config(tmp_path, study={"name": "s"})
    url = "postgresql://u:secret@db.example/studies"
    cfg = StudyConfig(name="s", storage=url)
    hint = study_command("report", cfg, ["--config", str(config), f"--study.storage={url}"])
    assert "secret" not in hint and "***" not in hint
    assert hint.startswith("lightning-dropout report s ") and STORAGE_ENV in hint
    # the same URL in the config file itself: the config locates the study
    located = write_config(tmp_path, "located.yaml", study={"name": "s", "storage": url})
    assert study_command("report", cfg, ["--config", str(located)]) == f"lightning-dropout report {located}"
    # a run directory changed on the command line: the name and the (password-free) SQLite URL
    moved = StudyConfig(name="s", run_dir=str(tmp_path / "elsewhere"))
    hint = study_command("best", moved, ["--config", str(config), f"--study.run_dir={moved.run_dir}"])
    assert hint == f"lightning-dropout best s --storage sqlite:///{tmp_path / 'elsewhere'}/s/study.db"
