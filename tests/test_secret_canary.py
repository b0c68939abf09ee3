"""Secrets never reach disk nor output: a password canary in the storage URL runs through ``tune`` (with DDP
trials), ``best``, ``report`` and ``fit --plan``; then every file the run wrote (run dir, ``lightning_logs``,
trial files, the HTML report, the plan) and all output are searched for it.

The throwaway PostgreSQL server trusts local connections and ignores the password, so the URL works.
"""

from __future__ import annotations

import stat
import uuid

import pytest
import yaml
from sqlalchemy.engine import make_url
from studies import BASE, write_config

from lightning_dropout.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

# as a user types it into the URL: every character a URL parser or a redactor may stop at ('@' must be
# percent-encoded for SQLAlchemy); every piece holds the marker, so a partial leak is caught too (7 characters:
# the report's base64 images and the event files' bytes hold any shorter string by chance)
MARK = "Cn7Xq0Z"
CANARY = "Cn7Xq0Z1?Cn7Xq0Z2 Cn7Xq0Z3'Cn7Xq0Z4\"Cn7Xq0Z5<Cn7Xq0Z6/Cn7Xq0Z7%40Cn7Xq0Z8"

# the tiny study on 2 CPU processes (its trials' arguments and environment carry the URL to each rank)
DDP = {"devices": 2, "strategy": "ddp", "max_epochs": 1, "limit_train_batches": 2, "limit_test_batches": 1}
GROUP = {**BASE["dropout"]["groups"][0], "variants": ["standard"], "per_layer": False}


def test_the_storage_password_reaches_no_file_and_no_output(
    postgres_url, tmp_path, data_dir, monkeypatch, capfd
):
    monkeypatch.chdir(tmp_path)  # defaults (runs/, lightning_logs/) land here too
    parts = make_url(postgres_url)
    url = f"{parts.drivername}://{parts.username}:{CANARY}@{parts.host}:{parts.port}/{parts.database}"
    assert make_url(url).password == CANARY.replace("%40", "@")  # what the driver receives
    name = f"canary-{uuid.uuid4().hex[:12]}"  # a study of its own in a database other runs may share
    path = write_config(
        tmp_path,
        trainer=DDP,
        dropout={"groups": [GROUP]},
        data={"init_args": {**BASE["data"]["init_args"], "cache_dir": str(data_dir)}},
        study={
            "name": name,
            "storage": url,
            "run_dir": "runs",
            "metric": "val_loss",
            "direction": "minimize",
            "n_trials": 2,
        },
    )

    # the storage also on the command line: the arguments a DDP trial process gets hold it
    assert main(["tune", str(path), "--storage", url]) == 0  # 2 trials, each a 2-process DDP run
    # nor does the storage: the study's attributes (its config, the per-section summary) hold it redacted
    from lightning_dropout.tune import open_study

    attrs = open_study(name, url).user_attrs
    assert ":***@" in attrs["config/study"] and MARK not in str(attrs)
    assert main(["best", name, "--storage", url, "--out", "best.yaml", "--config-out", "winner.yaml"]) == 0
    assert main(["report", name, "--storage", url, "--out", "report.html"]) == 0
    single = ["--trainer.devices=1", "--trainer.strategy=auto", f"--trainer.default_root_dir={tmp_path}"]
    assert main(["fit", str(path), "--plan", "best.yaml", *single]) == 0
    # the errors: a study that is not in the storage, and the printed config
    assert main(["best", "no-such-study", "--storage", url]) == 2
    assert main(["tune", str(path), "--storage", url, "--print_config"]) == 0
    output = capfd.readouterr()

    written = {p for p in tmp_path.rglob("*") if p.is_file() and p != path}
    names = {p.name for p in written}
    # the files that once held the password are among those checked
    assert "config.yaml" in names, names  # lightning_logs/version_0/config.yaml of `fit --plan`
    assert {"trial_0000.json", "trial_0001.json"} <= names, names  # the DDP trials' job files
    assert {"report.html", "best.yaml", "best_plan.yaml", "winner.yaml"} <= names, names
    assert any(n.startswith("events.out.tfevents") for n in names), names
    leaked = sorted(str(p.relative_to(tmp_path)) for p in written if MARK.encode() in p.read_bytes())
    assert leaked == [], leaked
    assert MARK not in output.out + output.err, [
        ln for ln in (output.out + output.err).splitlines() if MARK in ln
    ]
    assert ":***@" in output.err  # the study line names the storage, redacted
    assert (
        "no-such-study" in output.err and f"storage: {parts.drivername}://{parts.username}:***@" in output.out
    )
    for trial_file in (p for p in written if p.parent.name == "trial_io"):
        assert stat.S_IMODE(trial_file.stat().st_mode) == 0o600, trial_file
    saved = yaml.safe_load(next(p for p in written if p.name == "config.yaml").read_text())
    assert saved["study"]["storage"] == url.replace(CANARY, "***")
    assert yaml.safe_load((tmp_path / "winner.yaml").read_text())["study"]["storage"] == url.replace(
        CANARY, "***"
    )
    print(f"secret canary: {len(written)} files checked")  # shown with -s


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://user:pa/ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:p@ss@host:5432/db", "postgresql://user:***@host:5432/db"),
        ("postgresql://user:a@b/c@host/db", "postgresql://user:***@host/db"),
        ("postgresql://host/db?user=u&passwd=hunter2", "postgresql://host/db?user=u&passwd=***"),
        ("postgresql://host/db?pwd=hunter2&sslmode=require", "postgresql://host/db?pwd=***&sslmode=require"),
        (
            "mysql://root:Sec:ret@localhost/optuna?PASSWORD=x2",
            "mysql://root:***@localhost/optuna?PASSWORD=***",
        ),
        ("failed: 'postgresql://u:pw@h/d' refused", "failed: 'postgresql://u:***@h/d' refused"),
        ("sqlite:////tmp/a@b/study.db", "sqlite:////tmp/a@b/study.db"),
        ("postgresql://user:pa?ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:pa?ss@host/db?sslmode=require", "postgresql://user:***@host/db?sslmode=require"),
        ("postgresql://host/db?user=me@example.org", "postgresql://host/db?user=me@example.org"),
    ],
)
def test_redact_hides_passwords_with_special_characters(url, expected):
    from lightning_dropout.tune import redact

    assert redact(url) == expected


@pytest.mark.parametrize(
    "password", ["pa?ss", "a b", "q'uo\"te", "lt<gt>", "sl/ash", "x", "long?pass word'<x>/y"]
)
def test_a_remembered_password_is_hidden_whatever_its_characters(password):
    """A URL the program was given is parsed as SQLAlchemy parses it: its password is hidden wherever a line
    shows it, raw, percent-encoded or decoded, even where the URL's shape is lost (a space, a quote)."""
    from urllib.parse import quote

    from lightning_dropout.redaction import redact, remember

    url = f"postgresql://user:{password}@db-host:5432/optuna"
    remember(url)
    for text in (
        f"storage: {url}",
        f"could not connect to '{url}': refused",
        f"postgresql://user:{quote(password, safe='')}@db-host/optuna",
        make_url(url).render_as_string(hide_password=False),
    ):
        shown = redact(text)
        assert password not in shown.replace("user:***@", "") or len(password) == 1, shown
        assert "user:***@db-host" in shown, shown
