"""Run by tests/test_callback.py: a 2-process DDP fit (gloo, CPU) with DropoutInjector.

Lightning's ``ddp`` launcher re-runs this script for rank 1, so each rank writes what it saw to
``OUT/rank{r}.json``: the plan digest, the module tree and the parameter names the optimizer got.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import Rule
from lightning_dropout.callback import DropoutInjector


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.rnn = nn.GRU(16, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x).unsqueeze(1).repeat(1, 3, 1)
        out, _ = self.rnn(h)
        return self.head(out[:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        self.optimizer_param_names = sorted(n for n, _ in self.named_parameters())
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: Path) -> None:
    L.seed_everything(0)
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    injector = DropoutInjector(
        rules=[
            Rule(match=nn.Linear, variant="concrete", p=0.2),
            Rule(match=nn.GRU, variant="variational", p=0.3),
            Rule(match=nn.GRU, variant="weight", p=0.2),
        ]
    )
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[injector],
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    rank = trainer.global_rank
    record = {
        "rank": rank,
        "world_size": trainer.world_size,
        "digest": injector.plan.digest(),
        "plan": injector.plan.to_yaml(),
        "tree": repr(model),
        "optimizer_params": model.optimizer_param_names,
        "p_logits": {
            n: float(torch.sigmoid(p)) for n, p in model.named_parameters() if n.endswith("p_logit")
        },
        "finished": trainer.state.finished,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
