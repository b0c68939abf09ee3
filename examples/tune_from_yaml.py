"""Journey 2: launch a tuning study from YAML, take the winner, retrain it and read its test metrics.

    python examples/tune_from_yaml.py                       # configs/quickstart.yaml as it is (a few minutes)
    python examples/tune_from_yaml.py --n-trials 6 --max-epochs 5

The same as the shell commands

    lightning-dropout tune configs/quickstart.yaml
    lightning-dropout best quickstart --out plan.yaml
    lightning-dropout fit configs/quickstart.yaml --plan plan.yaml

driven from Python through the CLI entry point (``lightning_dropout.cli.main``), so the config is parsed and
validated exactly as on the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_dropout.cli import main as cli
from lightning_dropout.plan import DropoutPlan

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--n-trials", type=int, default=None, help="default: the config's study.n_trials")
    parser.add_argument(
        "--max-epochs", type=int, default=None, help="default: the config's trainer.max_epochs"
    )
    parser.add_argument(
        "--limit-batches", type=int, default=None, help="train/val batches per epoch (smoke runs)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="re-runs per candidate; default: the config's"
    )
    parser.add_argument("--run-dir", default="runs")
    parser.add_argument("--cache-dir", default=None, help="MNIST-1D cache directory")
    args = parser.parse_args(argv)

    overrides = [f"--study.run_dir={args.run_dir}"]
    if args.n_trials is not None:
        overrides.append(f"--study.n_trials={args.n_trials}")
    if args.seeds is not None:
        overrides.append(f"--study.seeds={args.seeds}")
    if args.max_epochs is not None:
        overrides.append(f"--trainer.max_epochs={args.max_epochs}")
    if args.limit_batches is not None:
        overrides += [
            f"--trainer.limit_train_batches={args.limit_batches}",
            f"--trainer.limit_val_batches={args.limit_batches}",
            f"--trainer.limit_test_batches={args.limit_batches}",
        ]
    if args.cache_dir is not None:
        overrides.append(f"--data.init_args.cache_dir={args.cache_dir}")

    # 1. the study: baselines first, sampled trials, re-runs of the best over seeds, best_plan.yaml
    if cli(["tune", args.config, *overrides]) != 0:
        raise SystemExit("the study failed; see the message above")
    plan_path = max(Path(args.run_dir).glob("*/best_plan.yaml"), key=lambda p: p.stat().st_mtime)
    plan = DropoutPlan.load(plan_path)

    # 2. retrain the winner and evaluate it on the test set, which the study never saw
    fit_overrides = [o for o in overrides if not o.startswith("--study.")]
    if cli(["fit", args.config, "--plan", str(plan_path), *fit_overrides]) != 0:
        raise SystemExit("retraining the winner failed; see the message above")
    return {"plan": plan, "plan_path": plan_path, "report": Path(args.run_dir) / plan_path.parent.name}


if __name__ == "__main__":
    out = main()
    print(f"winner written to {out['plan_path']}; inspect: tensorboard --logdir {out['report']}")
