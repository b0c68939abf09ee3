"""Exact resume: fit to epoch k, save, resume to epoch n; the weights and the logged metrics equal those of an
uninterrupted fit to n, bit for bit, with and without ``dropout_seed`` (the datamodule's shuffle is seeded per
epoch; the callback saves and restores the random states the masks are drawn from)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_dropout import Rule
from lightning_dropout.callback import DropoutInjector
from lightning_dropout.data import MNIST1DDataModule
from lightning_dropout.errors import DropoutConfigError
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
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
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


class SaveAtStep(Callback):
    """A checkpoint in the middle of an epoch, where ``ModelCheckpoint(every_n_train_steps=...)`` saves."""

    def __init__(self, path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("step", [6, 8, 9])  # mid-epoch 1 (2 of 4 batches), its end, mid-epoch 2 (1 of 4)
def test_a_fit_resumed_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_fit(tmp_path, data_dir, step):
    """The training loader is resumable: the resumed epoch trains on its remaining batches, in the same order."""
    straight, straight_metrics = _fit(data_dir, N, 7)
    ckpt = tmp_path / "mid.ckpt"
    _fit(data_dir, N, 7, callbacks=[SaveAtStep(ckpt, step)])
    assert ckpt.exists()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")
        resumed, resumed_metrics = _fit(data_dir, N, 7, ckpt_path=str(ckpt))

    delta = max(
        float((a - b).abs().max())
        for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
    )
    assert delta == 0.0, f"max |dw| = {delta}"
    assert resumed_metrics.by_epoch[N - 1] == straight_metrics.by_epoch[N - 1]


def test_a_resumable_loader_replays_the_rest_of_its_epoch_and_only_of_that_epoch(data_dir):
    data = MNIST1DDataModule(batch_size=50, num_samples=500, cache_dir=str(data_dir))
    data.prepare_data()
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(3)  # type: ignore[attr-defined]
    batches = iter(loader)
    seen = [next(batches)[1] for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 3, "batches": 2}
    rest = [y for _, y in batches]

    fresh = data.train_dataloader()  # a resumed fit builds its loader anew, then loads the state
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(3)  # type: ignore[attr-defined]
    replayed = [y for _, y in fresh]
    assert len(replayed) == len(rest) and all(torch.equal(a, b) for a, b in zip(replayed, rest, strict=True))
    assert fresh.state_dict() == {"epoch": 3, "batches": len(seen) + len(rest)}
    assert len(list(fresh)) == len(seen) + len(rest)  # the skip applies once

    ended = data.train_dataloader()  # a checkpoint at the end of epoch 3 resumes at epoch 4, from its start
    ended.load_state_dict({"epoch": 3, "batches": len(seen) + len(rest)})
    ended.sampler.set_epoch(4)  # type: ignore[attr-defined]
    assert len(list(ended)) == len(seen) + len(rest)
    with pytest.raises(DropoutConfigError, match="ResumableLoader state"):
        ended.load_state_dict({"batches": -1})


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
