"""Your own Optuna objective with lightning-dropout's search space: `suggest_plan` samples a dropout plan for
the model, `DropoutInjector(plan=...)` applies it, `TrialPruning` reports each validation and prunes.

    python examples/own_objective.py                      # 10 trials, one process per trial
    python examples/own_objective.py --ddp                # each trial on 2 DDP ranks (ddp_spawn, gloo on CPU)

Under DDP use `strategy="ddp_spawn"` and an RDB storage (SQLite here): the objective runs once, in this
process; Lightning spawns the ranks and sends them the callbacks, the trial included (an RDB storage travels,
an in-memory one would not); rank 0 reports to the storage. The plan is sampled here, before `fit`, so every
rank applies the same plan; after `fit` this process asks the storage whether the trial was pruned. (With
`strategy="ddp"` Lightning re-runs this whole script on every rank, the study loop included: use
`lightning-dropout tune`, which runs each multi-rank trial as its own process, for that.)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import torch

from lightning_dropout.callback import DropoutInjector
from lightning_dropout.data import MNIST1DDataModule
from lightning_dropout.tune import SearchGroup, TrialPruning, suggest_plan
from lightning_dropout.zoo import MLP


class EndProcessGroup(L.Callback):
    """ddp_spawn on gloo: every rank leaves the process group together before its spawned process exits (a rank
    that exits while another still holds the group can abort in gloo's teardown)."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


GROUPS = [
    SearchGroup(name="hidden", select={"match": "Linear"}, variants=["standard", "gaussian"], p=[0.0, 0.5])
]


def objective(trial: optuna.Trial, args: argparse.Namespace) -> float:
    L.seed_everything(0, verbose=False)
    model = MLP(hidden=100)
    plan = suggest_plan(trial, GROUPS, model, model.example_input_array)
    pruning = TrialPruning(trial, monitor="val_acc", direction="maximize", prune_after=0.5)
    ddp = {"strategy": "ddp_spawn", "devices": 2} if args.ddp else {"devices": 1}
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.max_epochs,
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
        callbacks=[DropoutInjector(plan=plan), pruning, *([EndProcessGroup()] if args.ddp else [])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **ddp,
    )
    trainer.fit(model, datamodule=MNIST1DDataModule(num_samples=4000, cache_dir=args.cache_dir))
    # ddp_spawn: the ranks' copies of `pruning` stayed in their processes; the storage has what rank 0 reported
    if pruning.pruned or (args.ddp and trial.should_prune()):
        raise optuna.TrialPruned()
    trial.set_user_attr("plan", plan.to_yaml())
    trial.set_user_attr("ranks", trainer.world_size)
    return float(trainer.callback_metrics["val_acc"])


def main(argv: list[str] | None = None) -> optuna.Study:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=10)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--limit-batches", type=int, default=None)
    parser.add_argument("--ddp", action="store_true", help="each trial on 2 DDP ranks (ddp_spawn)")
    parser.add_argument("--storage", default="sqlite:///runs/own_objective.db")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    if args.storage.startswith("sqlite:///"):
        Path(args.storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name="own_objective",
        storage=args.storage,
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3),
        load_if_exists=True,
    )
    study.optimize(lambda trial: objective(trial, args), n_trials=args.n_trials)
    best: dict[str, Any] = study.best_trial.user_attrs
    print(f"best val_acc {study.best_value:.4f} with plan:\n{best['plan']}")
    return study


if __name__ == "__main__":
    main()
