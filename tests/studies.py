"""A tiny tuning config (MLP on MNIST-1D, 2 epochs of 3 batches, 1 validation batch) and helpers to run
studies through the CLI, shared by the study tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import optuna
import yaml

from lightning_dropout.cli import main
from lightning_dropout.tune import open_study

BASE: dict[str, Any] = {
    "seed_everything": 0,
    "model": {"class_path": "lightning_dropout.zoo.MLP", "init_args": {"hidden": 16}},
    "data": {
        "class_path": "lightning_dropout.data.MNIST1DDataModule",
        "init_args": {"batch_size": 50, "num_samples": 500},
    },
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "limit_train_batches": 3,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "enable_checkpointing": False,
    },
    "dropout": {
        "groups": [
            {
                "name": "hidden",
                "select": {"match": "Linear"},
                "variants": ["standard", "gaussian"],
                "p": [0.05, 0.5],
                "per_layer": True,
            }
        ]
    },
    "study": {
        "name": "s",
        "metric": "val_acc",
        "direction": "maximize",
        "n_trials": 3,
        "pruner": None,
        "seeds": 0,
        "top_k": 1,
        # the shared tests count trials and read values: no warm-start grid, the best epoch's value
        # (tests/test_tune_selection.py covers the defaults)
        "warm_start": False,
        "value": "best",
    },
}


def tiny_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """BASE with each given section's keys replaced (shallowly); BASE itself is left as it is."""
    config = copy.deepcopy(BASE)
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def write_config(tmp_path: Path, name: str = "study.yaml", **sections: dict[str, Any]) -> Path:
    """:func:`tiny_config` written as YAML."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_config(**sections), sort_keys=False))
    return path


def tune(config: Path, tmp_path: Path, data_dir: Path, *extra: str) -> int:
    return main(
        [
            "tune",
            str(config),
            f"--study.run_dir={tmp_path / 'runs'}",
            f"--data.init_args.cache_dir={data_dir}",
            *extra,
        ]
    )


def sqlite_url(tmp_path: Path, name: str = "s") -> str:
    return f"sqlite:///{tmp_path / 'runs' / name / 'study.db'}"


def load(tmp_path: Path, name: str = "s") -> optuna.Study:
    return open_study(name, sqlite_url(tmp_path, name))


def error_line(
    err: str, *, rc: int | None = None, out: str = "", expect: tuple[str, ...] = (), ours_only: bool = True
) -> str:
    """The one error line a user error prints (``lightning-dropout: error: ...``), checked: exit status ``rc`` 2
    when given, no traceback, each of ``expect`` in it. With ``ours_only`` the other lines of ``err`` (the
    study's header and progress, Lightning's and Optuna's logging) are left out; without, ``err`` must be that
    line alone."""
    if rc is not None:
        assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    lines = err.strip().splitlines()
    if ours_only:
        lines = [line for line in lines if line.startswith("lightning-dropout:")]
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("lightning-dropout: error: "), line
    missing = [text for text in expect if text not in line]
    assert not missing, f"{missing} not in: {line}"
    return line
