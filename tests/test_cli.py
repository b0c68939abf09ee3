"""The lightning-dropout console script, called as main([...])."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_dropout.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "mnist1d_fit.yaml")


def _tiny(tmp_path: Path) -> list[str]:
    return [
        "--config",
        QUICKSTART,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.cache_dir={tmp_path / 'data'}",
    ]


def test_fit_runs_the_fit_config_and_writes_tensorboard_logs(tmp_path, capsys):
    assert main(["fit", *_tiny(tmp_path)]) == 0
    events = list((tmp_path / "runs" / "mnist1d_fit").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"


def test_describe_lists_sites_without_training(tmp_path, capsys):
    assert main(["describe", *_tiny(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "linear1:output" in out and "linear2:output" in out and "linear3" not in out
    assert "2x100" in out  # the shape each site sees, from the model's example_input_array


def test_a_config_with_yaml_merge_keys_is_accepted(tmp_path, capsys):
    """``<<: *anchor`` merges a mapping and the keys beside it override it: not a repeated key (it was refused
    as invalid YAML)."""
    from lightning_dropout.config import check_config_file

    config = tmp_path / "merged.yaml"
    config.write_text(
        "model: {class_path: lightning_dropout.zoo.MLP}\n"
        "dropout:\n"
        "  groups:\n"
        "  - &hidden {name: first, select: {name: linear1}, variants: [standard], p: [0.0, 0.5]}\n"
        "  - <<: *hidden\n"
        "    name: second\n"
        "    select: {name: linear2}\n"
    )
    check_config_file(str(config))
    assert main(["describe", str(config), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "name: second" in printed and "linear2" in printed and printed.count("- standard") == 2


def test_variants_lists_the_registry(capsys):
    from lightning_dropout.variants import VARIANTS

    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == sorted(VARIANTS)


def test_help_and_no_arguments(capsys):
    assert main(["--help"]) == 0
    assert "describe" in capsys.readouterr().out
    assert main([]) == 2


def test_the_tune_help_states_the_default_budget(capsys):
    from lightning_dropout.tune.config import DEFAULT_BUDGET

    assert main(["tune", "--help"]) == 0
    assert f"default {DEFAULT_BUDGET:g})" in capsys.readouterr().out


_MODULES_AFTER = """
import json, sys
from lightning_dropout.cli import main
heavy = ("torch", "lightning", "optuna", "jsonargparse")
seen = {"import": [m for m in heavy if m in sys.modules]}
for args in (
    ["--help"], ["--version"], ["variants"], *([c, "--help"] for c in ("best", "report", "tune", "describe", "variants", "fit"))
):
    try:
        main(args)
    except SystemExit:
        pass
    seen[" ".join(args)] = [m for m in heavy if m in sys.modules]
print(json.dumps(seen))
"""


def test_help_and_variants_import_nothing_heavy():
    # a fresh interpreter: this one has imported everything already
    proc = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER], capture_output=True, text=True, check=True, cwd=ROOT
    )
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    # the help texts are our own and `variants` reads the torch-free catalog of the built-in variants
    assert all(modules == [] for modules in seen.values()) and len(seen) == 10, seen


def test_lazy_package_names_are_the_public_objects():
    # a fresh interpreter: the engine's module imported first, then the package's lazy names
    code = (
        "import lightning_dropout.injection, lightning_dropout as ld\n"
        "from lightning_dropout import DropoutPlan, inject\n"
        "from lightning_dropout.plan import DropoutPlan as P\n"
        "print(callable(inject), inject is ld.inject, inject.__module__, DropoutPlan is P,"
        " set(ld.__all__) <= set(dir(ld)), hasattr(ld, 'nope'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert proc.stdout.split() == ["True", "True", "lightning_dropout.injection", "True", "True", "False"]


def test_the_old_module_path_of_the_engine_still_imports_with_a_deprecation_warning():
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    import lightning_dropout.inject\n"
        "    from lightning_dropout.inject import Rule, register_rate_attribute\n"
        "import lightning_dropout as ld, lightning_dropout.injection as engine\n"
        "print(Rule is engine.Rule, register_rate_attribute is engine.register_rate_attribute,"
        " ld.inject is engine.inject, len(seen), all(w.category is DeprecationWarning for w in seen),"
        " all(w.filename == '<string>' for w in seen))\n"
        "print(seen[0].message)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    flags, message = proc.stdout.splitlines()[:2]
    assert flags.split() == ["True", "True", "True", "2", "True", "True"]
    assert "`lightning_dropout.injection`" in message and "deprecated" in message


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.init_args.lr=-1"], "`lr` must be a number > 0, but got lr=-1.0."),
        (
            ["--trainer.max_epochsx=2"],
            "`trainer.max_epochsx` must be a known key, but it is not; nearest: ['trainer.max_epochs'",
        ),
        (
            ['--trainer.callbacks.init_args.rules=[{"match": "Linar", "p": 0.2}]'],
            "nearest in torch.nn: ['Linear'",
        ),
        (
            ['--trainer.callbacks.init_args.rules=[{"match": "Linear", "p": 1.2}]'],
            "0 <= p < 1, but got p=1.2",
        ),
        (
            ['--trainer.callbacks.init_args.rules=[{"match": "Linear", "variant": "spatial", "p": 0.2}]'],
            "site 'linear1:output': variant 'spatial' needs a feature map",
        ),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, extra, message):
    assert main(["describe", *_tiny(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightning-dropout: error: ")
    assert message in err[0]


def test_unknown_command_and_missing_config(capsys):
    assert main(["tune-me"]) == 2
    assert "the command must be one of" in capsys.readouterr().err
    assert main(["describe", "--config", "/no/such.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_describe_needs_an_injector(tmp_path, capsys):
    args = [a for a in _tiny(tmp_path)] + ["--trainer.callbacks=[]"]
    assert main(["describe", *args]) == 2
    assert "must list a lightning_dropout.callback.DropoutInjector" in capsys.readouterr().err


def test_tune_shortcuts_stand_for_study_keys():
    from lightning_dropout.cli import _study_shortcuts

    assert _study_shortcuts(
        ["--config", "x.yaml", "--workers", "2", "--n_trials=5", "--storage", "sqlite:///s.db"]
    ) == ["--config", "x.yaml", "--study.workers=2", "--study.n_trials=5", "--study.storage=sqlite:///s.db"]
    assert main(["tune", QUICKSTART, "--workers"]) == 2


def test_describe_existing_lists_the_models_own_dropout(tmp_path, capsys):
    transformer = str(ROOT / "configs" / "mnist1d_transformer.yaml")
    args = [f"--data.init_args.cache_dir={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path}"]
    assert main(["describe", transformer, "--existing", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["site", "module", "kind", "p", "shape"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["encoder.layers.0.self_attn:attribute"][:3] == ["MultiheadAttention", "rate", "attribute"]
    assert rows["encoder.layers.1.dropout2:replace"] == ["Dropout", "module", "0", "2x40x32"]
    assert len(rows) == 8
    # a config with no injector and no search groups: --existing still works; without it, the error says so
    plain = [*_tiny(tmp_path), "--trainer.callbacks=[]"]
    assert main(["describe", "--existing", *plain]) == 0
    assert capsys.readouterr().out == "MLP has no dropout of its own\n"
    assert main(["describe", *plain]) == 2
    assert "describe CONFIG --existing" in capsys.readouterr().err


def test_every_command_of_the_table_is_listed_has_its_help_and_is_named_on_a_typo(capsys):
    """One table (`cli._VERBS`) makes a command: the usage, `COMMAND --help` and the typo message read it."""
    from lightning_dropout import cli

    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert (
        usage.splitlines()[0]
        == f"usage: lightning-dropout {{{','.join(cli._VERBS)}}} [CONFIG.yaml] [overrides]"
    )
    for name, verb in cli._VERBS.items():
        assert f"\n  {verb.synopsis} " in usage
        assert main([name, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: lightning-dropout {name}")
    assert main(["tnue"]) == 2
    assert str(list(cli._VERBS)) in capsys.readouterr().err
