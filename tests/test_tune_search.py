"""The `search:` section: config values searched beside dropout, sampled per trial, applied through the config
(model, datamodule), kept by fixed trials and re-runs, shown in HParams, written by `best --config-out`."""

from __future__ import annotations

import json

import lightning as L
import pytest
import yaml
from studies import load, sqlite_url, tune, write_config

from lightning_dropout.cli import main
from lightning_dropout.config import load_config
from lightning_dropout.tune.config import CONFIG_SECTIONS

pytestmark = pytest.mark.usefixtures("one_thread")

SEARCH = {
    "model.init_args.weight_decay": {"low": 1e-5, "high": 1e-2, "log": True},
    "data.init_args.batch_size": {"type": "int", "low": 25, "high": 75, "step": 25},
}


class ValueProbe(L.Callback):
    """Appends, per run, the weight decay the model got and the batch size the datamodule got."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        with open(self.path, "a") as f:
            row = {
                "run": trainer.logger.version if trainer.logger else None,
                "weight_decay": pl_module.hparams.weight_decay,
                "batch_size": trainer.datamodule.batch_size,
            }
            f.write(json.dumps(row) + "\n")


def test_searched_values_reach_the_model_and_data_and_the_reruns(tmp_path, data_dir, capsys):
    probe_file = tmp_path / "probe.jsonl"
    probe = json.dumps(
        [{"class_path": "test_tune_search.ValueProbe", "init_args": {"path": str(probe_file)}}]
    )
    config = write_config(tmp_path, study={"n_trials": 3, "seeds": 2, "top_k": 1})
    config.write_text(config.read_text() + yaml.safe_dump({"search": SEARCH}))
    assert tune(config, tmp_path, data_dir, f"--trainer.callbacks={probe}") == 0

    runs = {row["run"]: row for row in map(json.loads, probe_file.read_text().splitlines())}
    trials = load(tmp_path).get_trials()
    baseline, sampled = trials[0], trials[1:]
    # the baseline keeps the config's own values; it suggests nothing
    assert "model.init_args.weight_decay" not in baseline.params
    assert runs["trial_0000"] == {"run": "trial_0000", "weight_decay": 0.0, "batch_size": 50}
    assert baseline.user_attrs["search"] == {
        "model.init_args.weight_decay": 0.0,
        "data.init_args.batch_size": 50,
    }
    for trial in sampled:
        wd, bs = trial.params["model.init_args.weight_decay"], trial.params["data.init_args.batch_size"]
        assert 1e-5 <= wd <= 1e-2 and bs in (25, 50, 75)
        assert runs[f"trial_{trial.number:04d}"] == {
            "run": f"trial_{trial.number:04d}",
            "weight_decay": wd,
            "batch_size": bs,
        }
    # every re-run trains with its trial's values
    reruns = {k: v for k, v in runs.items() if k.startswith("rerun_")}
    assert reruns
    for name, row in reruns.items():
        number = int(name.split("_")[1])
        values = trials[number].user_attrs["search"]
        assert (row["weight_decay"], row["batch_size"]) == (
            values["model.init_args.weight_decay"],
            values["data.init_args.batch_size"],
        )

    # `best --config-out`: the winning config, its values set, `plan:` the plan file; it loads for `fit`
    out = tmp_path / "winner.yaml"
    assert main(["best", "s", "--storage", sqlite_url(tmp_path), "--config-out", str(out)]) == 0
    assert "winning config written to" in capsys.readouterr().out
    written = yaml.safe_load(out.read_text())
    assert "search" not in written and written["plan"].endswith("winner_plan.yaml")
    cli = load_config(["--config", str(out)], instantiate=False, sections=CONFIG_SECTIONS)
    from lightning_dropout.tune import open_study
    from lightning_dropout.tune.records import winner_trial

    chosen = winner_trial(open_study("s", sqlite_url(tmp_path))).user_attrs["search"]
    assert cli.config["model.init_args.weight_decay"] == chosen["model.init_args.weight_decay"]
    assert cli.config["data.init_args.batch_size"] == chosen["data.init_args.batch_size"]


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        (
            {"model.init_args.weight_decy": {"low": 0.0, "high": 0.1}},
            ["'model.init_args.weight_decy'", "weight_decay"],
        ),
        ({"model.init_args.lr": {"low": 0.0, "high": 0.1, "log": True}}, ["`log: true` needs low > 0"]),
        ({"model.init_args.lr": {"low": 0.1, "high": 0.01}}, ["low <= high", "low=0.1"]),
        ({"model.init_args.lr": {"lo": 0.1}}, ["unknown ['lo']"]),
        (
            {"data.init_args.batch_size": {"type": "int", "low": 10.5, "high": 20}},
            ["integer low, high and step"],
        ),
        ({"study.seed": {"choices": [1, 2]}}, ["not of the tuner's own sections"]),
        (
            {"model.init_args.lr": {"type": "double", "low": 0.1, "high": 1}},
            ["['float', 'int', 'categorical']"],
        ),
        (
            {"model.init_args.lr": {"low": 0.001, "high": 0.1, "log": "false"}},
            ["`search.model.init_args.lr`.log must be true or false, but got 'false'"],
        ),
    ],
    ids=[
        "unknown-key",
        "log-at-zero",
        "reversed",
        "unknown-field",
        "int-fraction",
        "tuner-key",
        "bad-type",
        "log-as-string",
    ],
)
def test_a_bad_search_entry_stops_tune_before_trial_0(tmp_path, data_dir, capsys, search, expected):
    config = write_config(tmp_path)
    config.write_text(config.read_text() + yaml.safe_dump({"search": search}))
    assert tune(config, tmp_path, data_dir) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-dropout:")]
    assert len(lines) == 1, lines
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "runs" / "s" / "study.db").exists()
