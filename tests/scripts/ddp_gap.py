"""Run by tests/test_monitor.py: a fit with GapMonitor and a TensorBoardLogger in OUT, on DEVICES processes.

``python ddp_gap.py OUT 2`` runs DDP with 2 processes (gloo, CPU); Lightning's ``ddp`` launcher re-runs this
script for rank 1. ``OUT 1`` (or ``main(OUT, 1)``) is the single-process reference. The weights never change
(SGD with lr=0) and every size splits evenly over 2 ranks (64 training examples, a 32-example subset, 32
validation examples, batches of 8), so both runs must log the same figures. Each rank writes
``OUT/rank{r}.json`` with the monitor's history.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_dropout.monitor import GapMonitor


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
        self.val_acc = MulticlassAccuracy(3, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        per = F.cross_entropy(logits, y, reduction="none")
        self.val_acc(logits, y)
        self.log("val_loss", per.mean(), sync_dist=True)
        self.log("val_acc", self.val_acc)
        self.log("val_maxloss", per.max(), reduce_fx="max", sync_dist=True)
        self.log("val_sumloss", per.sum(), reduce_fx="sum", sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def main(out: Path, devices: int) -> None:
    L.seed_everything(0, verbose=False)
    model = Net()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = GapMonitor(num_samples=32, seed=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        logger=TensorBoardLogger(out, name="tb", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[monitor],
    )
    trainer.fit(model, DataLoader(data(64, 1), batch_size=8), DataLoader(data(32, 2), batch_size=8))
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "weights_unchanged": all(torch.equal(start[k], v) for k, v in model.state_dict().items()),
        "history": monitor.history,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
