"""Tune dropout from Python: a study built from objects, on the same code path as `lightning-dropout tune`.

    python examples/tune_from_python.py                  # 12 trials of the MNIST-1D MLP, 40 epochs
    python examples/tune_from_python.py --n-trials 4 --max-epochs 5

Prints the winning plan; `lightning-dropout tune runs/python_api/config.yaml` resumes the same study.
"""

from __future__ import annotations

import argparse
from typing import Any

from lightning_dropout.data import MNIST1DDataModule
from lightning_dropout.tune import SearchGroup, tune_study
from lightning_dropout.zoo import MLP


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--limit-batches", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--run-dir", default="runs")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    trainer: dict[str, Any] = {"max_epochs": args.max_epochs, "accelerator": "cpu", "devices": 1}
    if args.limit_batches:
        trainer.update(limit_train_batches=args.limit_batches, limit_val_batches=args.limit_batches)
    result = tune_study(
        MLP,
        MNIST1DDataModule,
        model_args={"hidden": 100},
        data_args={"num_samples": 4000, "cache_dir": args.cache_dir},
        trainer=trainer,
        dropout=[
            SearchGroup(
                name="hidden", select={"match": "Linear"}, variants=["standard", "gaussian"], p=[0.0, 0.5]
            )
        ],
        study={
            "name": "python_api",
            "metric": "val_acc",
            "direction": "maximize",
            "n_trials": args.n_trials,
            "seeds": args.seeds,
            "run_dir": args.run_dir,
        },
        search={"model.init_args.weight_decay": {"low": 1e-6, "high": 1e-2, "log": True}},  # tuned with it
        seed_everything=0,
    )
    print(f"winner over {len(result.study.trials)} trials:")
    print(result.plan.to_yaml() if result.plan is not None else "no trial completed")
    return {
        "plan": result.plan,
        "study": result.study,
        "candidates": result.candidates,
        "config": result.config_path,
    }


if __name__ == "__main__":
    main()
