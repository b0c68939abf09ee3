"""Every example script runs, with a tiny budget."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from pathlib import Path

import pytest
from studies import sqlite_url

from lightning_dropout.plan import DropoutPlan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_torch_example():
    plan = _load("plain_torch").main()
    assert {s.key for s in plan} == {"lstm:input", "lstm:output", "lstm:weight", "lstm:attribute"}


def test_attach_callback_example(tmp_path, data_dir):
    results = _load("attach_callback").main(
        [
            "--max-epochs",
            "2",
            "--limit-batches",
            "2",
            "--logdir",
            str(tmp_path),
            "--cache-dir",
            str(data_dir),
        ]
    )
    assert {"test_acc", "test_loss", "mc_mean_entropy"} <= set(results)
    assert list((tmp_path / "attach_callback").rglob("events.out.tfevents.*"))


def test_tune_from_yaml_example(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its `fit --plan` logs to ./lightning_logs, as a user's run would
    out = _load("tune_from_yaml").main(
        [
            "--n-trials",
            "2",
            "--max-epochs",
            "1",
            "--limit-batches",
            "2",
            "--seeds",
            "0",
            "--run-dir",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(data_dir),
        ]
    )
    assert out["plan_path"] == tmp_path / "runs" / "quickstart" / "best_plan.yaml"
    assert list((tmp_path / "runs" / "quickstart" / "trials").glob("trial_0001/events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "test_acc" in printed  # `fit --plan` evaluated the winner on the test set


def test_tensorboard_gap_example(tmp_path, data_dir, capsys):
    series = _load("tensorboard_gap").main(
        [
            "--max-epochs",
            "2",
            "--limit-batches",
            "3",
            "--logdir",
            str(tmp_path),
            "--cache-dir",
            str(data_dir),
        ]
    )
    for tag in (
        "gap/loss",
        "train_clean/loss",
        "train_dropout/loss",
        "mc/ece",
        "dropout/rate/linear1.output",
    ):
        assert series[tag], tag
    for val, clean, gap in zip(
        series["val_loss"], series["train_clean/loss"], series["gap/loss"], strict=True
    ):
        assert abs(gap - (val - clean)) < 1e-5
    assert "naive gap" in capsys.readouterr().out


def test_scale_out_example(tmp_path, data_dir):
    storage = os.environ.get("LIGHTNING_DROPOUT_TEST_POSTGRES")  # CI: a real PostgreSQL server
    # one worker here (tests/test_tune_storage.py runs 2 worker processes against PostgreSQL)
    args = ["--workers", "1", "--n-trials", "3", "--max-epochs", "1", "--limit-batches", "2"]
    args += [
        "--run-dir",
        str(tmp_path / "runs"),
        "--cache-dir",
        str(data_dir),
        "--name",
        f"ex_{uuid.uuid4().hex[:8]}",
    ]
    if storage:
        args += ["--storage", storage]
    out = _load("scale_out").main(args)
    study = out["study"]
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) >= 3
    assert all("plan" in t.user_attrs for t in finished)
    assert out["storage"] == (storage or sqlite_url(tmp_path, args[-1]))


def test_tune_from_python_example(tmp_path, data_dir, capsys):
    """The Python API: a study from objects, its result, and its config, which the CLI reads back."""
    from lightning_dropout.cli import main

    args = ["--n-trials", "3", "--max-epochs", "2", "--limit-batches", "2", "--seeds", "2"]
    out = _load("tune_from_python").main(
        [*args, "--run-dir", str(tmp_path / "runs"), "--cache-dir", str(data_dir)]
    )
    study = out["study"]
    assert study.study_name == "python_api" and len(study.trials) == 3
    assert study.trials[0].user_attrs["baseline"] == "no dropout"
    assert out["plan"] is not None and out["candidates"]  # re-run over 2 seeds, best first
    # searched beside dropout: every run records the value it trained with (fixed trials: the config's own)
    assert all("model.init_args.weight_decay" in t.user_attrs["search"] for t in study.trials)
    assert "winner over 3 trials" in capsys.readouterr().out
    # the written config is the study's: `best` on it reads the same winner back
    assert out["config"] == tmp_path / "runs" / "python_api" / "config.yaml"
    storage = sqlite_url(tmp_path, "python_api")
    assert main(["best", "python_api", "--storage", storage, "--out", str(tmp_path / "plan.yaml")]) == 0
    assert DropoutPlan.load(tmp_path / "plan.yaml") == out["plan"]


@pytest.mark.parametrize("ddp", [False, True], ids=["one-process", "ddp-spawn"])
def test_own_objective_example(tmp_path, data_dir, ddp, monkeypatch):
    """A hand-written Optuna objective with suggest_plan, DropoutInjector(plan=...) and TrialPruning, in one
    process and on 2 DDP ranks (ddp_spawn, gloo): every trial stores the plan its ranks trained."""
    args = ["--n-trials", "2", "--max-epochs", "2", "--limit-batches", "2", "--cache-dir", str(data_dir)]
    args += ["--storage", f"sqlite:///{tmp_path / 'study.db'}", *(["--ddp"] if ddp else [])]
    # importable by name, as a user's script is: ddp_spawn pickles its callbacks into the spawned ranks
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "own_objective", raising=False)
    study = importlib.import_module("own_objective").main(args)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    for trial in complete:
        plan = DropoutPlan.from_yaml(trial.user_attrs["plan"])
        assert {s.target for s in plan} <= {"linear1", "linear2"}
        assert sorted(trial.intermediate_values) == [0, 1]  # rank 0 reported each validation
        assert trial.user_attrs["ranks"] == (2 if ddp else 1)
