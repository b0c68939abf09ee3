"""The bad-input table: every bad config, command line or API call gives exit status 2 (or a
``DropoutConfigError``), exactly one line, no traceback, and a message that names the file or key, shows the
value and, where there is one, the nearest choice.

To add a case, append a row to CONFIG_CASES (a change to the tiny tuning config of ``tests/studies.py``),
CLI_CASES (a command line) or API_CASES (a call): the id, what to do, and the texts the message must hold.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from studies import BASE, error_line

from lightning_dropout.cli import main
from lightning_dropout.errors import DropoutConfigError

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

Config = dict[str, Any]


@dataclass(frozen=True)
class ConfigCase:
    """``command`` run on BASE changed by ``edit`` (or on the raw bytes ``raw``), plus ``extra`` arguments."""

    id: str
    edit: Callable[[Config], Any] | None
    expect: tuple[str, ...]
    command: str = "tune"
    extra: tuple[str, ...] = ()
    raw: bytes | None = None
    names_file: bool = True
    progress: bool = False  # found only by training: the study's header and progress lines come first


def _set(path: str, value: Any) -> Callable[[Config], None]:
    """An edit that sets the dotted ``path`` (``study.n_trials``; ``dropout.groups.0.p``) to ``value``."""

    def edit(config: Config) -> None:
        *parents, last = path.split(".")
        node: Any = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _drop(path: str) -> Callable[[Config], None]:
    def edit(config: Config) -> None:
        *parents, last = path.split(".")
        node: Any = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]

    return edit


def _group(**changes: Any) -> Callable[[Config], None]:
    return _set("dropout.groups", [{**BASE["dropout"]["groups"][0], **changes}])


INJECTOR = {
    "class_path": "lightning_dropout.callback.DropoutInjector",
    "init_args": {"rules": [{"match": "Linear", "p": 0.2}]},
}


def _rules(*rules: dict[str, Any]) -> Callable[[Config], None]:
    return _set("trainer.callbacks", [{**INJECTOR, "init_args": {"rules": list(rules)}}])


# four levels of ten aliases each: 10,000 nodes once expanded (the cases add a level or a doubling)
ALIAS_BOMB = b"".join(
    f"{name}: &{name} [{', '.join([item] * 10)}]\n".encode()
    for name, item in (("a", "x"), ("b", "*a"), ("c", "*b"), ("d", "*c"))
)


CONFIG_CASES = [
    # a setting given on the command line instead of in the file: the parser's own errors name no file
    ConfigCase(
        "override-study-key-typo", None, ("n_trails",), extra=("--study.n_trails=3",), names_file=False
    ),
    ConfigCase(
        "override-storage-scheme",
        None,
        ("`study.storage`", "journal:"),
        extra=("--study.storage=redis://host/0",),
        names_file=False,
    ),
    ConfigCase(
        "override-group-variant-typo",
        None,
        ("'standrd'", "Did you mean 'standard'"),
        extra=(
            '--dropout.groups=[{"name": "hidden", "select": {"match": "Linear"}, "variants": ["standrd"]}]',
        ),
    ),
    # -- the model, data and trainer sections --------------------------------------------------------------
    ConfigCase(
        "model-init-arg-type", _set("model.init_args.hidden", "abc"), ("model.init_args.hidden", "abc")
    ),
    ConfigCase("model-init-arg-unknown", _set("model.init_args.hiden", 16), ("hiden", "nearest", "hidden")),
    ConfigCase("model-init-arg-value", _set("model.init_args.lr", -1), ("lr", "-1")),
    ConfigCase(
        "model-class-typo",
        _set("model.class_path", "lightning_dropout.zoo.MLPP"),
        ("model.class_path", "MLPP", "'MLP'"),
    ),
    ConfigCase(
        "model-module-missing", _set("model.class_path", "nope.Nope"), ("model.class_path", "nope.Nope")
    ),
    ConfigCase("data-batch-size", _set("data.init_args.batch_size", 0), ("batch_size", "0")),
    ConfigCase("data-val-fraction", _set("data.init_args.val_fraction", 1.5), ("val_fraction", "1.5")),
    ConfigCase(
        "data-init-arg-type", _set("data.init_args.batch_size", "many"), ("data.init_args.batch_size", "many")
    ),
    ConfigCase("trainer-key-typo", _set("trainer.max_epoch", 2), ("trainer.max_epoch", "trainer.max_epochs")),
    ConfigCase("trainer-value-type", _set("trainer.max_epochs", "two"), ("trainer.max_epochs", "two")),
    ConfigCase("top-level-key-typo", _set("studdy", {"name": "x"}), ("studdy", "'study'")),
    ConfigCase(
        "top-level-data-class",
        _set("data.class_path", "lightning_dropout.data.MNIST2D"),
        ("data.class_path", "MNIST2D", "MNIST1DDataModule"),
    ),
    ConfigCase("trainer-max-epochs-negative", _set("trainer.max_epochs", -5), ("max_epochs", "-5")),
    ConfigCase("trainer-devices-zero", _set("trainer.devices", 0), ("devices=0",)),
    ConfigCase("trainer-accelerator", _set("trainer.accelerator", "tpu2"), ("tpu2", "cpu")),
    ConfigCase(
        "trainer-precision", _set("trainer.precision", "bad"), ("trainer.precision", "bad", "16-mixed")
    ),
    ConfigCase(  # was "must be LightningModule or None" / "choices: []"
        "model-key-beside-class-path",
        _set("model.init_arg", {"hidden": 8}),
        ("model.init_arg", "beside `class_path`", "init_args"),
    ),
    ConfigCase("study-storage-type", _set("study.storage", 5), ("study.storage", "str or None", "5")),
    # -- study: -----------------------------------------------------------------------------------------------
    ConfigCase("study-key-typo", _set("study.n_trial", 3), ("study.n_trial", "study.n_trials")),
    ConfigCase(
        "study-direction", _set("study.direction", "maximise"), ("study.direction", "maximise", "maximize")
    ),
    ConfigCase("study-n-trials-zero", _set("study.n_trials", 0), ("study.n_trials", "n_trials=0")),
    ConfigCase("study-n-trials-type", _set("study.n_trials", "many"), ("study.n_trials", "many")),
    ConfigCase("study-workers-zero", _set("study.workers", 0), ("study.workers", "workers=0")),
    ConfigCase("study-seeds-negative", _set("study.seeds", -1), ("study.seeds", "seeds=-1")),
    ConfigCase("study-mc-samples-one", _set("study.mc_samples", 1), ("study.mc_samples", "mc_samples=1")),
    ConfigCase("study-timeout-negative", _set("study.timeout", -5), ("study.timeout", "-5")),
    ConfigCase("study-name-space", _set("study.name", "my study"), ("study.name", "my study")),
    ConfigCase(
        "study-sampler-typo",
        _set("study.sampler", {"class_path": "optuna.samplers.TPESamplr"}),
        ("study.sampler.class_path", "TPESamplr", "optuna.samplers.TPESampler"),
    ),
    ConfigCase(
        "study-sampler-arg",
        _set("study.sampler", {"class_path": "optuna.samplers.TPESampler", "init_args": {"n_startup": 3}}),
        ("study.sampler", "n_startup"),
    ),
    ConfigCase(
        "study-sampler-not-mapping", _set("study.sampler", "TPESampler"), ("study.sampler", "TPESampler")
    ),
    ConfigCase(
        "study-sampler-former-form",
        _set("study.sampler", {"name": "TPESampler", "args": {"multivariate": True}}),
        ("study.sampler", "class_path: optuna.samplers.TPESampler", '"multivariate": true'),
    ),
    ConfigCase(
        "study-pruner-typo",
        _set("study.pruner", {"class_path": "optuna.pruners.MedianPrunr"}),
        ("study.pruner.class_path", "MedianPrunr", "optuna.pruners.MedianPruner"),
    ),
    ConfigCase(
        "study-pruner-not-a-pruner",
        _set("study.pruner", {"class_path": "optuna.samplers.TPESampler"}),
        ("study.pruner.class_path", "optuna.samplers.TPESampler", "BasePruner"),
    ),
    ConfigCase(
        "study-storage-scheme",
        _set("study.storage", "redis://host/0"),
        ("study.storage", "redis://host/0", "sqlite:///"),
    ),
    ConfigCase(
        "study-storage-proc",
        _set("study.storage", "sqlite:////proc/nope/study.db"),
        ("study.storage", "/proc/nope/study.db"),
    ),
    ConfigCase(
        "study-storage-journal-device",
        _set("study.storage", "journal:/dev/null"),
        ("study.storage", "journal:/dev/null", "not a regular file"),
    ),
    ConfigCase(
        "study-storage-in-memory",
        _set("study.storage", "sqlite://"),
        ("study.storage", "'sqlite://'", "in-memory", "sqlite:///PATH.db"),
    ),
    ConfigCase(
        "study-run-dir-unwritable", _set("study.run_dir", "/proc/nope"), ("study.run_dir", "/proc/nope")
    ),
    ConfigCase(  # the storage elsewhere: every trial used to fail with "you tried to log nan"
        "study-run-dir-unwritable-storage-elsewhere",
        _set("study.run_dir", "/proc/nope"),
        ("study.run_dir", "/proc/nope"),
        extra=("--study.storage=sqlite:///{tmp}/elsewhere/study.db",),
    ),
    ConfigCase(
        "study-run-dir-under-a-file",
        None,
        ("study.run_dir", "study.yaml/runs", "not a directory"),
        extra=("--study.run_dir={tmp}/study.yaml/runs",),
    ),
    ConfigCase(
        "study-metric-never-logged",
        _set("study.metric", "val_accuracy"),
        ("study.metric", "val_accuracy", "val_acc"),
        progress=True,
    ),
    # -- dropout: ---------------------------------------------------------------------------------------------
    ConfigCase("dropout-no-groups", _set("dropout.groups", []), ("dropout.groups",)),
    ConfigCase("dropout-variant-typo", _group(variants=["standrd"]), ("standrd", "standard")),
    ConfigCase("dropout-p-reversed", _group(p=[0.5, 0.1]), ("dropout.groups['hidden']", "p=[0.5, 0.1]")),
    ConfigCase("dropout-p-too-high", _group(p=[0.0, 1.5]), ("p[1]", "1.5")),
    ConfigCase("dropout-p-one-value", _group(p=[0.1]), ("dropout.groups['hidden']", "p=[0.1]")),
    ConfigCase(
        "dropout-log-zero",
        _group(log=True, p=[0.0, 0.5]),
        ("dropout.groups['hidden']", "log: true", "p=[0.0, 0.5]"),
    ),
    ConfigCase(
        "dropout-select-key", _group(select={"matc": "Linear"}), ("dropout.groups['hidden']", "matc", "match")
    ),
    ConfigCase("dropout-select-class-typo", _group(select={"match": "Linar"}), ("Linar", "Linear")),
    ConfigCase(
        "dropout-match-nothing",
        _group(select={"match": "Conv2d"}),
        ("dropout.groups['hidden']", "Conv2d", "Linear"),
    ),
    ConfigCase(
        "dropout-name-nothing",
        _group(select={"name": "nonexistent*"}),
        ("dropout.groups['hidden']", "nonexistent*", "linear1"),
    ),
    ConfigCase(
        "dropout-variant-misfit",
        _group(variants=["dropblock"]),
        ("dropout.groups['hidden']", "dropblock", "linear1"),
    ),
    ConfigCase(
        "dropout-params-unlisted",
        _group(variants=["standard"], params={"dropblock": {"block_size": [3]}}),
        ("dropout.groups['hidden']", "dropblock"),
    ),
    ConfigCase(
        "dropout-params-unknown",
        _group(variants=["dropblock"], params={"dropblock": {"size": [3]}}),
        ("dropout.groups['hidden']", "size", "block_size"),
    ),
    ConfigCase(  # a later choice was only found when a trial drew it
        "dropout-params-later-choice",
        _group(variants=["dropblock"], params={"dropblock": {"block_size": [3, -5]}}),
        ("dropout.groups['hidden']", "params.dropblock.block_size[1]", "-5", ">= 1"),
    ),
    ConfigCase(
        "dropout-depth-scaling",
        _group(per_layer=False, depth_scaling=["quadratic"]),
        ("dropout.groups['hidden']", "quadratic", "linear"),
    ),
    ConfigCase("dropout-group-name-slash", _group(name="a/b"), ("a/b",)),
    ConfigCase(
        "dropout-duplicate-groups",
        lambda c: c["dropout"].update(groups=[BASE["dropout"]["groups"][0]] * 2),
        ("dropout.groups", "hidden"),
    ),
    ConfigCase("dropout-group-key-typo", _group(variant=["standard"]), ("variant", "variants")),
    # -- the injector of fit/describe ---------------------------------------------------------------------
    ConfigCase(
        "rule-class-typo", _rules({"match": "Linar", "p": 0.2}), ("Linar", "'Linear'"), command="describe"
    ),
    ConfigCase("rule-rate", _rules({"match": "Linear", "p": 1.2}), ("p=1.2",), command="describe"),
    ConfigCase(
        "rule-variant-misfit",
        _rules({"match": "Linear", "variant": "spatial", "p": 0.2}),
        ("spatial", "linear1"),
        command="describe",
    ),
    ConfigCase(
        "rule-unknown-key", _rules({"match": "Linear", "rate": 0.2}), ("rate", "'p'"), command="describe"
    ),
    ConfigCase(
        "rule-variant-typo",
        _rules({"match": "Linear", "variant": "gausian", "p": 0.2}),
        ("gausian", "gaussian"),
        command="describe",
    ),
    ConfigCase(
        "describe-no-injector",
        lambda config: (_set("trainer.callbacks", [])(config), _set("dropout.groups", [])(config)),
        ("DropoutInjector", "dropout.groups"),
        command="describe",
        names_file=False,
    ),
    ConfigCase(
        "injector-dropout-seed-type",
        _set(
            "trainer.callbacks", [{**INJECTOR, "init_args": {**INJECTOR["init_args"], "dropout_seed": True}}]
        ),
        ("trainer.callbacks.init_args.dropout_seed", "int or None", "True"),
        command="describe",
    ),
    ConfigCase(
        "injector-rules-and-plan",
        _set("trainer.callbacks", [{**INJECTOR, "init_args": {**INJECTOR["init_args"], "plan": "p.yaml"}}]),
        ("trainer.callbacks[0]", "exactly one of `rules` and `plan`"),
        command="describe",
    ),
    # -- the file itself --------------------------------------------------------------------------------------
    ConfigCase("file-empty", None, ("empty",), raw=b""),
    ConfigCase("file-deep-flow", None, ("nest", "deep"), raw=b"model: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ConfigCase("file-study-null", _set("study", None), ("`study`", "mapping", "study: null")),
    ConfigCase("file-study-list", _set("study", []), ("`study`", "mapping", "study: []")),
    ConfigCase("file-trainer-list", _set("trainer", []), ("`trainer`", "mapping", "trainer: []")),
    ConfigCase("file-binary", None, ("UTF-8",), raw=bytes(range(256)) * 4),
    ConfigCase("file-not-mapping", None, ("mapping", "list"), raw=b"- a\n- b\n"),
    ConfigCase("file-yaml-syntax", None, ("YAML", "line"), raw=b"study: {name: x\nmodel: [\n"),
    ConfigCase(
        "file-duplicate-key",
        None,
        ("study", "twice", "line"),
        raw=yaml.safe_dump(BASE).encode() + b"study:\n  name: other\n",
    ),
    ConfigCase(
        "file-alias-bomb",
        None,
        ("alias", "10,000"),
        raw=ALIAS_BOMB + b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nmodel: *e\n",
    ),
    ConfigCase(
        "file-duplicate-nested-key",
        None,
        ("n_trials", "twice"),
        raw=yaml.safe_dump(BASE).encode().replace(b"  n_trials: 3\n", b"  n_trials: 3\n  n_trials: 4\n"),
    ),
]


@dataclass(frozen=True)
class CliCase:
    """A command line; ``{tmp}`` in an argument is the test's tmp_path, ``{config}`` a valid config there."""

    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    plan: bytes | None = None  # written to {tmp}/plan.yaml


CLI_CASES = [
    CliCase(
        "variants-extra-argument", ("variants", "gaussian"), ("`variants` takes no arguments", "'gaussian'")
    ),
    CliCase(
        "report-no-study", ("report", "nope", "--storage", "sqlite:///{tmp}/nope.db"), ("'nope'", "nope.db")
    ),
    CliCase("validate-config-missing", ("validate", "{tmp}/nope.yaml"), ("nope.yaml", "does not exist")),
    CliCase(
        "test-plan-missing", ("test", "{config}", "--plan", "{tmp}/nope.yaml"), ("plan file", "nope.yaml")
    ),
    CliCase("predict-no-config", ("predict",), ("must give ['data', 'model']",)),
    CliCase("unknown-command", ("tunee",), ("command", "tunee", "'tune'")),
    CliCase("tune-no-config", ("tune",), ("config",)),
    CliCase("config-missing", ("tune", "{tmp}/nope.yaml"), ("nope.yaml", "does not exist")),
    CliCase("workers-no-value", ("tune", "{config}", "--workers"), ("--workers", "value")),
    CliCase("n-trials-not-int", ("tune", "{config}", "--n_trials", "abc"), ("study.n_trials", "abc")),
    CliCase(
        "override-unknown", ("tune", "{config}", "--study.n_trails=3"), ("study.n_trails", "study.n_trials")
    ),
    CliCase("override-bad-json", ("tune", "{config}", "--dropout.groups=[{"), ("dropout.groups", "[{")),
    CliCase("best-no-study", ("best",), ("study",)),
    CliCase("best-unknown-flag", ("best", "s", "--outt", "x.yaml"), ("--outt", "--out")),
    CliCase(
        "best-no-such-study",
        ("best", "nope", "--storage", "sqlite:///{tmp}/empty.db"),
        ("nope", "does not exist"),  # and no empty.db is left behind: tests/test_optuna_native.py
    ),
    CliCase("best-bad-storage", ("best", "s", "--storage", "redis://h/0"), ("storage", "redis://h/0")),
    CliCase(
        "report-bad-storage",
        ("report", "s", "--storage", "sqlite:////proc/nope/x.db"),
        ("storage", "/proc/nope/x.db"),
    ),
    CliCase("fit-plan-missing", ("fit", "{config}", "--plan", "{tmp}/nope.yaml"), ("plan", "nope.yaml")),
    CliCase(
        "fit-plan-binary",
        ("fit", "{config}", "--plan", "{tmp}/plan.yaml"),
        ("plan.yaml", "UTF-8"),
        plan=bytes(range(256)),
    ),
    CliCase(
        "fit-plan-bad-rate",
        ("fit", "{config}", "--plan", "{tmp}/plan.yaml"),
        ("plan.yaml", "sites[0]", "p=2"),
        plan=b"sites:\n- {target: linear1, where: output, variant: standard, p: 2}\n",
    ),
    CliCase(
        "fit-plan-not-mapping",
        ("fit", "{config}", "--plan", "{tmp}/plan.yaml"),
        ("plan.yaml", "sites"),
        plan=b"- 1\n",
    ),
    CliCase(
        "fit-plan-unknown-site",
        ("fit", "{config}", "--plan", "{tmp}/plan.yaml"),
        ("linear9", "linear1"),
        plan=b"sites:\n- {target: linear9, where: output, variant: standard, p: 0.2}\n",
    ),
    CliCase(
        "fit-plan-two-sites-keys",
        ("fit", "{config}", "--plan", "{tmp}/plan.yaml"),
        ("plan.yaml", "`sites`", "twice"),
        plan=b"sites:\n- {target: linear1, where: output, variant: standard, p: 0.2}\nsites: []\n",
    ),
    CliCase(
        "fit-plan-alias-bomb",
        ("fit", "{config}", "--plan", "{tmp}/plan.yaml"),
        ("plan.yaml", "alias", "10,000"),
        plan=ALIAS_BOMB + b"sites: [*d, *d]\n",
    ),
    CliCase("tune-name-dot-dot", ("tune", "{config}", "--study.name=.."), ("study.name", "'..'")),
    CliCase(  # a million CPU processes: tune hung
        "tune-devices-huge", ("tune", "{config}", "--trainer.devices=1000000"), ("trainer.devices", "1000000")
    ),
    CliCase(  # OverflowError in Lightning
        "describe-devices-overflow",
        ("describe", "{config}", "--trainer.devices=" + "9" * 20),
        ("trainer.devices", "9" * 20, "1,024"),
    ),
    CliCase(  # ModuleNotFoundError traceback
        "tune-accelerator-tpu",
        ("tune", "{config}", "--trainer.accelerator=tpu"),
        ("not installed", "torch_xla"),
    ),
    CliCase(  # it was ignored in silence, and repeated in the "train the winner" line
        "tune-plan",
        ("tune", "{config}", "--plan", "{tmp}/plan.yaml"),
        ("`plan` must not be given to `tune`", "plan.yaml", "fit CONFIG --plan"),
        plan=b"sites: []\n",
    ),
    CliCase(
        "tune-seed-huge", ("tune", "{config}", "--study.seed=" + "9" * 30), ("study.seed", "2,147,483,647")
    ),
    CliCase("tune-seeds-huge", ("tune", "{config}", "--study.seeds=1000000"), ("study.seeds", "100")),
    CliCase("tune-top-k-huge", ("tune", "{config}", "--study.top_k=1000000"), ("study.top_k", "100")),
    CliCase("tune-workers-huge", ("tune", "{config}", "--workers", "1000000"), ("study.workers", "256")),
    CliCase("describe-config-no-value", ("describe", "--config"), ("--config",)),
]


def _api_cases() -> list[tuple[str, Callable[[], Any], tuple[str, ...]]]:
    import optuna

    from lightning_dropout import DropoutPlan, Rule, apply_plan, describe, inject, undo
    from lightning_dropout.callback import DropoutInjector, load_checkpoint
    from lightning_dropout.errors import check_rate
    from lightning_dropout.plan import Site
    from lightning_dropout.tune import SearchGroup, StudyConfig, suggest_plan, tune_study
    from lightning_dropout.variants import dropout, gaussian_dropout, get_variant
    from lightning_dropout.zoo import MLP

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    plan = DropoutPlan([Site("0", "output", "standard", 0.2)])
    group = SearchGroup(name="hidden", select={"match": "Linear"}, variants=["standard"])
    return [
        ("rule-unknown-arg", lambda: Rule(foo=1), ("foo", "Rule", "match")),
        ("rule-unknown-arg-typo", lambda: Rule(mach="Linear"), ("mach", "match")),
        ("rule-rate", lambda: Rule(match="Linear", p=1.5), ("p=1.5",)),
        ("rule-variant-typo", lambda: Rule(match="Linear", variant="standrd"), ("standrd", "standard")),
        ("inject-plan-positional", lambda: inject(model, plan), ("inject", "plan=", "DropoutPlan")),
        ("inject-string-positional", lambda: inject(model, "Linear"), ("inject", "'Linear'", "match=")),
        ("plan-from-yaml-int", lambda: DropoutPlan.from_yaml(42), ("42", "YAML text")),
        ("plan-from-yaml-sites", lambda: DropoutPlan.from_yaml("sites: 3"), ("sites", "3")),
        ("plan-load-missing", lambda: DropoutPlan.load("/no/such/plan.yaml"), ("/no/such/plan.yaml",)),
        ("site-bad-where", lambda: Site("0", "outside", "standard", 0.2), ("where", "outside", "output")),
        (
            "injector-bad-seed",
            lambda: DropoutInjector(rules=[Rule(match="Linear", p=0.2)], dropout_seed="x"),
            ("dropout_seed", "'x'"),
        ),
        ("group-no-variants", lambda: SearchGroup(name="g", variants=[]), ("variants", "[]")),
        ("study-direction", lambda: StudyConfig(direction="up"), ("study.direction", "'up'", "maximize")),
        ("variant-unknown", lambda: get_variant("gausian"), ("gausian", "gaussian")),
        ("check-rate-str", lambda: check_rate("x"), ("p='x'",)),
        ("rule-name-int", lambda: Rule(name=42), ("`name`", "42", "glob")),
        (
            "rule-exclude-output-string",
            lambda: Rule(match="Linear", p=0.1, exclude_output_layer="false"),
            ("exclude_output_layer", "'false'", "true or false"),
        ),
        (
            "inject-string-model",
            lambda: inject("x", [Rule(match="Linear", p=0.1)]),
            ("inject", "nn.Module", "'x'"),
        ),
        ("apply-plan-none-model", lambda: apply_plan(None, plan), ("apply_plan", "nn.Module", "None")),
        ("describe-string-model", lambda: describe("net"), ("describe", "nn.Module", "'net'")),
        ("undo-none-model", lambda: undo(None), ("undo", "nn.Module")),
        ("twin-rate-one", lambda: dropout(torch.ones(3), 1.0), ("p=1.0", "0 <= p < 1")),
        ("twin-gaussian-rate-one", lambda: gaussian_dropout(torch.ones(3), 1.0), ("p=1.0",)),
        (
            "suggest-plan-none-model",
            lambda: suggest_plan(optuna.create_study().ask(), [group], None),
            ("suggest_plan", "nn.Module", "None"),
        ),
        (
            "suggest-plan-one-group",
            lambda: suggest_plan(optuna.create_study().ask(), group, model),
            ("suggest_plan", "list of SearchGroup", "SearchGroup("),
        ),
        ("study-config-typo", lambda: StudyConfig(n_trial=3), ("n_trial", "nearest: ['n_trials'")),
        (
            "tune-study-typo",
            lambda: tune_study(MLP, type(model), dropout=[group], study={"n_trial": 3}),
            ("n_trial", "n_trials"),
        ),
        ("load-checkpoint-none", lambda: load_checkpoint(MLP, None), ("load_checkpoint", "None")),
        (
            "load-checkpoint-missing",
            lambda: load_checkpoint(MLP, "/no/such/epoch=1.ckpt"),
            ("checkpoint_path", "/no/such/epoch=1.ckpt"),
        ),
    ]


def _check_one_line(rc: int, out: str, err: str, expect: tuple[str, ...], progress: bool = False) -> str:
    # the study's own lines (header, progress bar) may precede the error; otherwise it is all there is
    return error_line(err, rc=rc, out=out, expect=expect, ours_only=progress)


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.id for c in CONFIG_CASES])
def test_bad_config(
    case: ConfigCase, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a default that reaches the disk (lightning_logs/) lands here
    path = tmp_path / "study.yaml"
    if case.raw is not None:
        path.write_bytes(case.raw)
    else:
        config = copy.deepcopy(BASE)
        config["study"]["run_dir"] = str(tmp_path / "runs")
        config["data"]["init_args"]["cache_dir"] = str(data_dir)
        if case.command == "describe":
            config["trainer"]["callbacks"] = [INJECTOR]
        if case.edit is not None:
            case.edit(config)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    rc = main([case.command, str(path), *(a.replace("{tmp}", str(tmp_path)) for a in case.extra)])
    captured = capsys.readouterr()
    line = _check_one_line(rc, captured.out, captured.err, case.expect, case.progress)
    if case.names_file:
        assert str(path) in line, line
    if case.command == "tune" and not case.progress:
        assert not (tmp_path / "runs").exists()  # nothing was created: the config failed before the study


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_command_line(
    case: CliCase, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "study.yaml"
    good = copy.deepcopy(BASE)
    good["data"]["init_args"]["cache_dir"] = str(data_dir)
    good["study"]["run_dir"] = str(tmp_path / "runs")
    config.write_text(yaml.safe_dump(good, sort_keys=False))
    if case.plan is not None:
        (tmp_path / "plan.yaml").write_bytes(case.plan)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{config}", str(config)) for a in case.argv]
    rc = main(argv)
    captured = capsys.readouterr()
    _check_one_line(rc, captured.out, captured.err, case.expect)


API_IDS = [c[0] for c in _api_cases()]


@pytest.mark.parametrize("index", range(len(API_IDS)), ids=API_IDS)
def test_bad_api_call(index: int) -> None:
    _, call, expect = _api_cases()[index]
    with pytest.raises(DropoutConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message.strip(), message
    missing = [text for text in expect if text not in message]
    assert not missing, f"{missing} not in: {message}"


def test_the_table_covers_every_command_and_every_config_section() -> None:
    from lightning_dropout.cli import _VERBS

    for ids in ([c.id for c in CONFIG_CASES], [c.id for c in CLI_CASES], API_IDS):
        assert len(ids) == len(set(ids)), "a table's case ids must be unique"
    commands = {c.argv[0] for c in CLI_CASES if c.argv[0] in _VERBS} | {c.command for c in CONFIG_CASES}
    assert commands == set(_VERBS), f"commands without a bad input: {set(_VERBS) - commands}"
    edited = {c.id.split("-")[0] for c in CONFIG_CASES if c.edit is not None}
    assert set(BASE) - {"seed_everything"} <= edited, (
        f"config sections without a bad value: {set(BASE) - edited}"
    )
