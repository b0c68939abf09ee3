"""Journey 4: scale a study out: several worker processes, several machines, several devices per trial.

    # one machine, 2 worker processes sharing one study (SQLite is fine for local workers)
    python examples/scale_out.py --workers 2

    # many machines: run the same command on each, against one PostgreSQL database
    python examples/scale_out.py --storage postgresql://user:password@db-host:5432/optuna --workers 4

    # each trial on 2 devices with DDP (GPUs, or 2 CPU processes with gloo on a machine without GPU)
    python examples/scale_out.py --devices 2 --strategy ddp

The shell equivalent is ``lightning-dropout tune configs/quickstart.yaml --workers 2 --storage URL
--trainer.devices=2 --trainer.strategy=ddp``: every process and machine joins the same study by name, the study
stops at ``n_trials`` finished trials in total, a killed worker's trial is retried (RDB storages), and under
``ddp`` each trial is one Optuna trial for all ranks. Passwords in the URL are never printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_dropout.cli import main as cli
from lightning_dropout.tune import open_study, redact

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--name", default="scale_out", help="the study name every worker and machine joins")
    parser.add_argument("--storage", default=None, help="default: sqlite:///<run-dir>/<name>/study.db")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1, help="devices per trial")
    parser.add_argument("--strategy", default="auto", help="e.g. ddp with --devices 2")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    parser.add_argument("--n-trials", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument(
        "--limit-batches", type=int, default=None, help="train/val batches per epoch (smoke runs)"
    )
    parser.add_argument("--run-dir", default="runs")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)

    overrides = [
        f"--study.name={args.name}",
        f"--study.run_dir={args.run_dir}",
        "--study.seeds=0",  # the re-runs over seeds happen once, wherever `tune` finishes
        f"--trainer.devices={args.devices}",
        f"--trainer.strategy={args.strategy}",
        f"--trainer.accelerator={args.accelerator}",
    ]
    if args.storage:
        overrides.append(f"--study.storage={args.storage}")
    if args.n_trials is not None:
        overrides.append(f"--study.n_trials={args.n_trials}")
    if args.max_epochs is not None:
        overrides.append(f"--trainer.max_epochs={args.max_epochs}")
    if args.limit_batches is not None:
        overrides += [
            f"--trainer.limit_train_batches={args.limit_batches}",
            f"--trainer.limit_val_batches={args.limit_batches}",
        ]
    if args.cache_dir is not None:
        overrides.append(f"--data.init_args.cache_dir={args.cache_dir}")
    if cli(["tune", args.config, "--workers", str(args.workers), *overrides]) != 0:
        raise SystemExit("the study failed; see the message above")

    storage = args.storage or f"sqlite:///{Path(args.run_dir) / args.name / 'study.db'}"
    study = open_study(args.name, storage)
    trials = study.get_trials(deepcopy=False)
    print(f"study {args.name} in {redact(storage)}: {len(trials)} trials, best value {study.best_value:.4f}")
    return {"study": study, "storage": storage}


if __name__ == "__main__":
    main()
