"""LightningCLI conventions in the command line: each subcommand's own `--help`, `--version`, and `describe`
previewing a tuning config's search space."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import optuna
import pytest
import torch
from studies import write_config

from lightning_dropout.cli import main
from lightning_dropout.tune.space import SearchGroup, space_dimensions, suggest_plan
from lightning_dropout.zoo import MLP

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("command", "own", "not_own"),
    [
        ("tune", ["--workers", "--n_trials", "--storage", "--study.KEY"], ["--out", "--plan"]),
        ("describe", ["search dimensions", "DropoutInjector", "--existing"], ["--workers", "--out"]),
        ("variants", ["variant"], ["--workers", "--storage"]),
        ("best", ["--config", "--storage", "--out", "plan"], ["--workers"]),
        ("report", ["--config", "--storage", "--out", "HTML"], ["--workers"]),
    ],
)
def test_each_subcommand_has_its_own_help(command, own, not_own, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"lightning-dropout {command}" in out
    assert all(o in out for o in own), out
    assert not any(o in out for o in not_own), out
    assert "{fit,validate,test,predict" not in out  # not the general usage


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_lightning_commands_have_a_short_help_and_lightning_clis_full_one(command, capsys):
    assert main([command, "--help"]) == 0
    short = capsys.readouterr().out
    assert short.startswith(f"usage: lightning-dropout {command} CONFIG.yaml") and "--plan" in short
    assert f"lightning-dropout {command} --help-all" in short and "--trainer.max_epochs" not in short
    if command == "fit":  # the full one builds LightningCLI's parser: every Trainer option, and ours
        assert main([command, "--help-all"]) == 0
        full = capsys.readouterr().out
        assert "--plan" in full and "--trainer.max_epochs" in full


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"lightning-dropout {importlib.metadata.version('lightning-dropout')}\n"


def test_describe_previews_the_search_space_of_a_tuning_config(tmp_path, data_dir, capsys):
    config = write_config(
        tmp_path,
        dropout={
            "groups": [
                {"name": "hidden", "select": {"match": "Linear"}, "variants": ["standard", "gaussian"]},
                {
                    "name": "first",
                    "select": {"name": "linear1", "where": "input"},
                    "variants": ["standard"],
                    "p": [0.1, 0.3],
                    "per_layer": True,
                },
            ]
        },
    )
    assert main(["describe", str(config), f"--data.init_args.cache_dir={data_dir}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("search space: 2 groups, 3 sites, 4 dimensions")
    assert "group hidden:" in out and "sites (2): linear1:output, linear2:output" in out
    assert "group first:" in out and "sites (1): linear1:input" in out
    for name in ("hidden/variant", "hidden/standard/p", "hidden/gaussian/p", "first/linear1/standard/p"):
        assert name in out
    assert "linear3" not in out  # the output layer is never a site


def test_describe_previews_the_values_searched_beside_dropout(tmp_path, data_dir, capsys):
    search = {
        "model.init_args.lr": {"low": 0.001, "high": 0.03, "log": True},
        "data.init_args.batch_size": {"type": "int", "low": 25, "high": 100, "step": 25},
    }
    config = write_config(tmp_path, search=search)
    assert main(["describe", str(config), f"--data.init_args.cache_dir={data_dir}"]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("search: 2 values beside dropout (sampled in every trial)")
    assert [line.split() for line in out[at + 1 :]] == [
        ["model.init_args.lr", "[0.001,", "0.03]", "log"],
        ["data.init_args.batch_size", "int", "[25,", "100]", "step", "25"],
    ]
    # a search key that is not in the config: one line, as `tune` says it
    config = write_config(tmp_path, search={"model.init_args.lrr": {"low": 0.001, "high": 0.03}})
    assert main(["describe", str(config), f"--data.init_args.cache_dir={data_dir}"]) == 2
    assert "'model.init_args.lrr' is not" in capsys.readouterr().err


def test_describe_with_a_plan_shows_the_plans_sites_not_the_search(tmp_path, data_dir, capsys):
    """``describe CONFIG --plan PLAN`` shows what ``fit CONFIG --plan PLAN`` trains (it showed the config's
    search space, ignoring the plan)."""
    config = write_config(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text("sites:\n- {target: linear2, where: output, variant: gaussian, p: 0.3}\n")
    assert main(["describe", str(config), "--plan", str(plan), f"--data.init_args.cache_dir={data_dir}"]) == 0
    out = capsys.readouterr().out
    assert "linear2:output" in out and "gaussian" in out and "0.3" in out
    assert "linear1" not in out and "search space" not in out


def test_describe_without_injector_or_search_groups_fails_in_one_line(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, dropout={"groups": []})
    assert main(["describe", str(config), f"--data.init_args.cache_dir={data_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dropout.groups" in err[0] and "DropoutInjector" in err[0]


def test_the_previewed_dimensions_are_the_parameters_trials_suggest():
    model = MLP(hidden=16)
    example = torch.zeros(2, 40)
    groups = [
        SearchGroup(
            "hidden",
            {"match": "Linear"},
            ["standard", "gaussian"],
            p=[0.0, 0.5],
            params={"standard": {"scaling": ["inverted", "inference"]}},
            depth_scaling=["none", "linear"],
        ),
        SearchGroup(
            "inputs", {"name": "linear2", "where": "input"}, ["standard"], p=[0.1, 0.4], per_layer=True
        ),
    ]
    dims = {k for g in groups for k in space_dimensions(g, model, example)}
    seen: set[str] = set()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        suggest_plan(trial, groups, model, example)
        seen |= {k for k, d in trial.distributions.items() if not d.single()}
    assert seen == dims
    assert "hidden/standard/scaling" in dims and "hidden/depth_scaling" in dims
    assert "inputs/linear2/standard/scaling" not in dims  # one choice: fixed, not a dimension
