"""Journey 3: what TensorBoard shows about dropout, and why the usual "gap" misleads.

    python examples/tensorboard_gap.py --max-epochs 30 --logdir runs
    tensorboard --logdir runs/tensorboard_gap

Trains the MNIST-1D MLP with strong dropout and three callbacks: ``DropoutInjector`` (per-site rates and
dropped fractions), ``GapMonitor`` (the training data evaluated like validation, dropout off, next to the
dropout-on figure) and ``UncertaintyMonitor`` (MC-dropout calibration error and entropy). Then it reads the
event file back with TensorBoard's own reader and prints, per epoch, the naive gap (validation loss minus the
loss on training data with dropout on) next to the true one (minus the same data with dropout off).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_dropout import Rule
from lightning_dropout.callback import DropoutInjector
from lightning_dropout.data import MNIST1DDataModule
from lightning_dropout.monitor import GapMonitor
from lightning_dropout.uncertainty import UncertaintyMonitor
from lightning_dropout.zoo import MLP


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--p", type=float, default=0.5, help="dropout rate after each hidden layer")
    parser.add_argument(
        "--limit-batches", type=int, default=None, help="train/val batches per epoch (smoke runs)"
    )
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)

    L.seed_everything(0)
    logger = TensorBoardLogger(args.logdir, name="tensorboard_gap", default_hp_metric=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.max_epochs,
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
        callbacks=[
            DropoutInjector(rules=[Rule(match=nn.Linear, p=args.p)], track_drop_fraction=True),
            GapMonitor(num_samples=256),
            UncertaintyMonitor(n_samples=10),
        ],
    )
    data = MNIST1DDataModule(batch_size=100, cache_dir=args.cache_dir)
    trainer.fit(MLP(), datamodule=data)

    events = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"scalars": 0})
    events.Reload()
    series = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    naive = [v - t for v, t in zip(series["val_loss"], series["train_dropout/loss"], strict=True)]
    print(
        f"{'epoch':>5} {'val_loss':>9} {'train, dropout on':>18} {'train, dropout off':>19} {'naive gap':>10} {'gap':>8}"
    )
    for epoch, (val, on, off, fake, true) in enumerate(
        zip(
            series["val_loss"],
            series["train_dropout/loss"],
            series["train_clean/loss"],
            naive,
            series["gap/loss"],
            strict=True,
        )
    ):
        print(f"{epoch:>5} {val:>9.4f} {on:>18.4f} {off:>19.4f} {fake:>10.4f} {true:>8.4f}")
    print(
        f"MC dropout, last epoch: ECE {series['mc/ece'][-1]:.4f} (without dropout {series['mc/ece_no_dropout'][-1]:.4f}), "
        f"entropy {series['mc/entropy'][-1]:.3f} nats"
    )
    print(f"tensorboard --logdir {logger.log_dir}")
    return series


if __name__ == "__main__":
    main()
