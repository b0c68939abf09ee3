"""Exact resume: fit to epoch k, save, resume to epoch n; the weights and the logged metrics equal those of an
uninterrupted fit to n, bit for bit, with and without ``dropout_seed`` (the datamodule's shuffle is seeded per
epoch; the callback saves and restores the random states the masks are drawn from)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_dropout import Rule
from lightning_dropout.callback import DropoutInjector
from lightning_dropout.data import MNIST1DDataModule
from lightning_dropout.zoo import MLP

pytestmark = pytest.mark.usefixtures("one_thread")

K, N = 2, 4


class Metrics(Callback):
    """Every logged metric after each validation, by epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.by_epoch[trainer.current_epoch] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.by_epoch.setdefault(trainer.current_epoch, {}).update(
            {k: float(v) for k, v in trainer.callback_metrics.items()}
        )


def _fit(
    data_dir, max_epochs: int, dropout_seed: int | None, callbacks=(), ckpt_path=None
) -> tuple[MLP, Metrics]:
    L.seed_everything(0, verbose=False)
    model = MLP(hidden=32)
    metrics = Metrics()
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.3)], dropout_seed=dropout_seed)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[injector, metrics, *callbacks],
    )
    data = MNIST1DDataModule(batch_size=50, num_samples=500, cache_dir=str(data_dir))
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, metrics


@pytest.mark.parametrize("dropout_seed", [None, 7])
def test_resumed_fit_equals_uninterrupted_fit_bit_for_bit(tmp_path, data_dir, dropout_seed):
    straight, straight_metrics = _fit(data_dir, N, dropout_seed)
    _fit(data_dir, K, dropout_seed, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    resumed, resumed_metrics = _fit(data_dir, N, dropout_seed, ckpt_path=str(tmp_path / "last.ckpt"))

    delta = max(
        float((a - b).abs().max())
        for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
    )
    assert delta == 0.0, f"max |dw| = {delta}"
    assert sorted(resumed_metrics.by_epoch) == list(range(K, N))
    for epoch in range(K, N):
        assert resumed_metrics.by_epoch[epoch] == straight_metrics.by_epoch[epoch], epoch


def test_the_training_order_is_a_function_of_seed_and_epoch(data_dir):
    data = MNIST1DDataModule(batch_size=50, num_samples=500, cache_dir=str(data_dir))
    data.prepare_data()
    data.setup("fit")
    loader = data.train_dataloader()

    def order(epoch: int) -> torch.Tensor:
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]  # what Lightning calls per epoch
        return torch.cat([y for _, y in loader])

    first = order(1)
    assert torch.equal(order(1), first)  # rebuilding or re-iterating never changes an epoch's order
    assert torch.equal(torch.cat([y for _, y in data.train_dataloader()]), order(0))
    assert not torch.equal(order(0), first)
    state = torch.get_rng_state()
    order(2)
    assert torch.equal(torch.get_rng_state(), state)  # iterating draws nothing from the global generator
