"""Behaviour of the MNIST-1D datamodule and of the example model zoo."""

from __future__ import annotations

import socket
from pathlib import Path

import lightning as L
import mnist1d.data
import numpy as np
import pytest
import torch
from torch.nn.modules.dropout import _DropoutNd

from lightning_dropout.data import CACHE_ENV_VAR, MNIST1DDataModule, default_cache_dir
from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.zoo import CNN, GRU, MLP, MNIST1DClassifier, TransformerEncoderClassifier

MODELS = [MLP, CNN, GRU, TransformerEncoderClassifier]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cache holding the default (5000-sequence) dataset, generated once for the module."""
    path = tmp_path_factory.mktemp("mnist1d-cache")
    MNIST1DDataModule(cache_dir=str(path)).prepare_data()
    return str(path)


def _ready(**kwargs) -> MNIST1DDataModule:
    dm = MNIST1DDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _rows(dataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in dataset.tensors[0]}


# ---------------------------------------------------------------------------------------------- data


def test_sizes_shapes_and_dtypes(cache_dir: str) -> None:
    dm = _ready(cache_dir=cache_dir)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (3600, 400, 1000)
    assert (dm.num_classes, dm.input_length) == (10, 40)
    for loader, n in (
        (dm.train_dataloader(), 3600),
        (dm.val_dataloader(), 400),
        (dm.test_dataloader(), 1000),
    ):
        x, y = next(iter(loader))
        assert x.shape == (100, 40) and x.dtype == torch.float32
        assert y.shape == (100,) and y.dtype == torch.int64
        assert sum(len(b[1]) for b in loader) == n
    labels = torch.cat([ds.tensors[1] for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)])
    assert labels.min() >= 0 and labels.max() < 10
    assert set(labels.tolist()) == set(range(10))


def test_split_is_deterministic_disjoint_and_from_training_data(cache_dir: str) -> None:
    a, b = _ready(cache_dir=cache_dir), _ready(cache_dir=cache_dir)
    for name in ("train_dataset", "val_dataset", "test_dataset"):
        for ta, tb in zip(getattr(a, name).tensors, getattr(b, name).tensors, strict=True):
            assert torch.equal(ta, tb)
    train, val, test = _rows(a.train_dataset), _rows(a.val_dataset), _rows(a.test_dataset)
    assert not train & val and not (train | val) & test
    everything = _ready(cache_dir=cache_dir, val_fraction=0.0)
    assert train | val == _rows(everything.train_dataset)  # validation is carved from the 4000 training rows
    assert test == _rows(everything.test_dataset)
    # The training shuffle is seeded too.
    assert torch.equal(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])


def test_val_fraction_zero_means_no_validation(cache_dir: str) -> None:
    dm = _ready(cache_dir=cache_dir, val_fraction=0)
    assert len(dm.train_dataset) == 4000 and dm.val_dataset is None
    assert dm.val_dataloader() == []


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0, 1.5])
def test_bad_val_fraction_raises(val_fraction: float) -> None:
    expected = f"`val_fraction` must satisfy 0 <= val_fraction < 1, but got {val_fraction=}."
    with pytest.raises(ValueError) as info:
        MNIST1DDataModule(val_fraction=val_fraction)
    assert str(info.value) == expected


def test_cache_is_reused_and_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _ready(cache_dir=str(tmp_path), num_samples=200)
    assert first.cache_path.is_file() and list(tmp_path.iterdir()) == [first.cache_path]  # no temp left over

    def boom(*args, **kwargs):
        raise AssertionError("make_dataset must not run when the cache exists")

    monkeypatch.setattr(mnist1d.data, "make_dataset", boom)
    second = _ready(cache_dir=str(tmp_path), num_samples=200)
    assert torch.equal(first.test_dataset.tensors[0], second.test_dataset.tensors[0])
    assert len(second.train_dataset) + len(second.val_dataset) == 160
    with pytest.raises(AssertionError, match="must not run"):  # other args -> other key -> generation
        _ready(cache_dir=str(tmp_path), num_samples=200, seed=7)


def test_generation_touches_no_network_nor_global_rng(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    dm = _ready(cache_dir=str(tmp_path), num_samples=200, seed=3)
    assert np.array_equal(np.random.get_state()[1], before)
    assert len(dm.test_dataset) == 40


def test_cache_dir_default_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "lightning_dropout" / "mnist1d"
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    assert MNIST1DDataModule().cache_path.parent == tmp_path / "mnist1d"


# ---------------------------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda cls: cls.__name__)
def test_zoo_model_shapes_no_dropout_and_trains(model_cls: type[MNIST1DClassifier], cache_dir: str) -> None:
    torch.manual_seed(0)
    model = model_cls()
    assert model(torch.randn(3, 40)).shape == (3, 10)
    # no active dropout: the Transformer keeps inert p=0 slots for replace rules
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, _DropoutNd))
    assert all(m.dropout == 0.0 for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention))
    last_name, last = list(model.named_children())[-1]
    assert last_name == ("linear3" if model_cls is MLP else "head")
    assert isinstance(last, torch.nn.Linear) and last.out_features == 10

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    dm = MNIST1DDataModule(cache_dir=cache_dir)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, model.parameters(), strict=True))
    metrics = trainer.callback_metrics
    assert {"train_loss_step", "train_loss_epoch", "val_loss", "val_acc"} <= set(metrics)
    assert torch.isfinite(metrics["train_loss_epoch"])
    trainer.test(model, datamodule=dm, verbose=False)
    assert 0.0 <= float(trainer.callback_metrics["test_acc"]) <= 1.0


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
def test_fit_without_validation(cache_dir: str) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MLP(), datamodule=MNIST1DDataModule(cache_dir=cache_dir, val_fraction=0.0))
    assert trainer.global_step == 1 and "val_loss" not in trainer.callback_metrics


def test_bad_model_args_raise() -> None:
    with pytest.raises(ValueError, match="`nhead` must divide `d_model`"):
        TransformerEncoderClassifier(d_model=30, nhead=4)
    with pytest.raises(ValueError, match="`lr` must be a number > 0"):
        MLP(lr=0.0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: MNIST1DDataModule(batch_size=0),
            "`batch_size` must be an integer >= 1, but got batch_size=0.",
        ),
        (lambda: MNIST1DDataModule(num_workers=-1), "`num_workers` must be an integer >= 0"),
        (lambda: MNIST1DDataModule(num_samples=5), "`num_samples` must be an integer >= 10"),
        (lambda: MLP(lr=0), "`lr` must be a number > 0, but got lr=0."),
        (lambda: MLP(weight_decay=-1.0), "`weight_decay` must be a number >= 0"),
    ],
)
def test_the_zoo_and_the_data_module_raise_the_one_user_error_type(build, message):
    with pytest.raises(DropoutConfigError) as info:
        build()
    assert str(info.value).startswith(message)
