"""Journey 1: attach DropoutInjector to a Trainer, train on MNIST-1D, inspect the sites, MC-dropout predict.

    python examples/attach_callback.py --max-epochs 20 --logdir runs

Writes TensorBoard logs (loss, accuracy, per-site rates) to ``runs/attach_callback``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_dropout import Rule, describe, format_sites
from lightning_dropout.callback import DropoutInjector
from lightning_dropout.data import MNIST1DDataModule
from lightning_dropout.mc import mc_predict, predictive_entropy
from lightning_dropout.schedules import EarlyDropout
from lightning_dropout.zoo import CNN


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument(
        "--limit-batches",
        type=float,
        default=1.0,
        help="batches per epoch: a fraction (<= 1.0) or a count (> 1)",
    )
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    limit = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches

    L.seed_everything(0)
    model = CNN()
    data = MNIST1DDataModule(batch_size=100, cache_dir=args.cache_dir)
    injector = DropoutInjector(
        rules=[
            Rule(match=nn.Conv1d, variant="spatial", p=0.1),  # whole channels after each convolution
            Rule(name="conv3", variant="dropblock", p=0.1, params={"block_size": 3}),  # conv3: blocks instead
        ],
        schedule=EarlyDropout(cutoff=max(args.max_epochs // 2, 1)),  # dropout early only (Liu et al. 2023)
    )
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        callbacks=[injector],
        logger=TensorBoardLogger(args.logdir, "attach_callback"),
        limit_train_batches=limit,
        limit_val_batches=limit,
        limit_test_batches=limit,
        enable_progress_bar=False,
        log_every_n_steps=5,
    )
    trainer.fit(model, data)
    print(format_sites(describe(model, model.example_input_array)))
    results = trainer.test(model, data, verbose=False)[0]

    x, _ = next(iter(data.test_dataloader()))
    pred = mc_predict(model, x, n_samples=20, transform=lambda z: z.softmax(-1))
    results["mc_mean_entropy"] = float(predictive_entropy(pred.mean).mean())
    print({k: round(v, 4) for k, v in results.items()})
    return results


if __name__ == "__main__":
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    main()
