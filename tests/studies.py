"""A tiny tuning config (MLP on MNIST-1D, 2 epochs of 3 batches, 1 validation batch) and helpers to run
studies through the CLI, shared by the study tests."""

from __future__ import annotations

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


def write_config(tmp_path: Path, name: str = "study.yaml", **sections: dict[str, Any]) -> Path:
    """BASE with each given section's keys replaced (shallowly), written as YAML."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key, value in sections.items():
        config[key] = {**config[key], **value}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
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
