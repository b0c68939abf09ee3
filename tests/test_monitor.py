"""GapMonitor and UncertaintyMonitor: what they log (against hand computations and Lightning's own validation
figures), that they leave training untouched, when they run, TensorBoard output, bad input and DDP."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lightning_dropout import DropoutConfigError, Rule
from lightning_dropout.callback import DropoutInjector
from lightning_dropout.monitor import GapMonitor, LogCapture, metric_base_name
from lightning_dropout.scalars import site_groups, site_name
from lightning_dropout.uncertainty import UncertaintyMonitor

HERE = Path(__file__).parent
CLASSES = 3
MONITOR_PREFIXES = ("gap/", "train_clean/", "train_dropout/", "mc/", "timing/")


# ----------------------------------------------------------------------------------------------------------
# A tiny classifier whose validation_step logs in one of several styles
# ----------------------------------------------------------------------------------------------------------
def dataset(n: int, seed: int, features: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


class Net(L.LightningModule):
    """fc1 -> [BatchNorm1d] -> relu -> nn.Dropout(p) (or nothing) -> fc2 -> relu -> head."""

    def __init__(
        self, p: float | None = None, style: str = "tensor", bn: bool = False, lr: float = 0.1
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.bn = nn.BatchNorm1d(32) if bn else nn.Identity()
        self.drop = nn.Dropout(p) if p is not None else nn.Identity()
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, CLASSES)
        self.style = style
        self.lr = lr
        self.train_acc = MulticlassAccuracy(CLASSES, average="micro")
        self.val_acc = MulticlassAccuracy(CLASSES, average="micro")
        self.val_metrics = MetricCollection(
            {"acc": MulticlassAccuracy(CLASSES, average="micro"), "f1": MulticlassAccuracy(CLASSES)},
            prefix="val_",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.fc1(x))))
        return self.head(torch.relu(self.fc2(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_acc.update(logits, y)  # state accumulates over the epoch, across validations
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        per = F.cross_entropy(logits, y, reduction="none")
        loss, acc = per.mean(), (logits.argmax(-1) == y).float().mean()
        style = self.style
        if style == "tensor":
            self.log("val_loss", loss)
            self.log("val_acc", acc)
        elif style == "metric":
            self.val_acc(logits, y)
            self.log("val_loss", loss)
            self.log("val_acc", self.val_acc)
        elif style == "metric_update":
            self.val_acc.update(logits, y)
            self.log("val_acc", self.val_acc)
        elif style == "log_dict":
            self.log_dict({"val_loss": loss, "val_acc": acc})
        elif style == "collection":
            self.val_metrics(logits, y)
            self.log_dict(self.val_metrics)
        elif style == "slash":
            self.log("val/loss", loss)
            self.log("val/acc", acc)
        elif style == "batch_size":
            self.log("val_loss", loss, batch_size=1)  # every batch weighs the same
        elif style == "reduce":
            self.log("val_loss", loss)
            self.log("val_maxloss", per.max(), reduce_fx="max")
            self.log("val_sumloss", per.sum(), reduce_fx="sum")
            self.log("val_minloss", per.min(), reduce_fx=torch.min)
        else:  # pragma: no cover
            raise AssertionError(style)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def subset(size: int, n: int, seed: int) -> torch.Tensor:
    """The indices GapMonitor must use: drawn once with its own generator, sorted."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values


@torch.no_grad()
def by_hand(model: nn.Module, data: TensorDataset, idx: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Eval-mode figures of ``model`` on ``data[idx]`` in batches of ``batch_size``, each reduced as logged."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    x, y = data.tensors[0][idx], data.tensors[1][idx]
    logits = model(x)
    for m, flag in flags.items():
        m.training = flag
    per = F.cross_entropy(logits, y, reduction="none")
    batch_means = [float(chunk.mean()) for chunk in per.split(batch_size)]
    return {
        "loss": float(per.mean()),
        "acc": float((logits.argmax(-1) == y).float().mean()),
        "batch_mean_loss": sum(batch_means) / len(batch_means),
        "maxloss": float(per.max()),
        "sumloss": float(per.sum()),
        "minloss": float(per.min()),
    }


def loaders(train: TensorDataset, val: TensorDataset, batch_size: int = 8, shuffle: bool = False):
    return DataLoader(train, batch_size=batch_size, shuffle=shuffle), DataLoader(val, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------------
# GapMonitor: the figures
# ----------------------------------------------------------------------------------------------------------
def test_train_clean_is_the_eval_mode_figure_on_the_fixed_subset_and_gap_is_val_minus_it():
    torch.manual_seed(0)
    train, val = dataset(60, seed=1), dataset(30, seed=2)
    model = Net(p=0.6)
    monitor = GapMonitor(num_samples=20, seed=3, batch_size=7)  # 7 + 7 + 6: unequal batches
    t = trainer(callbacks=[monitor])  # one epoch: the final weights are the ones the monitor saw
    t.fit(model, *loaders(train, val))
    last = monitor.history[-1]
    assert set(last) == {
        "epoch", "timing/gap_seconds",
        "train_clean/loss", "train_clean/acc", "gap/loss", "gap/acc", "train_dropout/loss", "train_dropout/acc",
    }  # fmt: skip
    expected = by_hand(model, train, subset(60, 20, seed=3), batch_size=7)
    assert last["train_clean/loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert last["train_clean/acc"] == pytest.approx(expected["acc"], abs=1e-6)
    # the hand computation can tell subsets apart, so the match above pins the subset down
    other = by_hand(model, train, subset(60, 20, seed=4), batch_size=7)
    assert abs(other["loss"] - expected["loss"]) > 1e-3
    validation = by_hand(model, val, torch.arange(30), batch_size=8)
    assert float(t.callback_metrics["val_loss"]) == pytest.approx(validation["loss"], abs=1e-5)
    for name in ("loss", "acc"):
        val_value = float(t.callback_metrics[f"val_{name}"])
        assert last[f"gap/{name}"] == pytest.approx(val_value - last[f"train_clean/{name}"], abs=1e-6)
        # ... and everything went to callback_metrics too
        for kind in ("train_clean", "gap", "train_dropout"):
            assert float(t.callback_metrics[f"{kind}/{name}"]) == pytest.approx(
                last[f"{kind}/{name}"], abs=1e-6
            )
    # dropout on (p=0.6) gives another figure, labelled train_dropout
    assert abs(last["train_dropout/loss"] - last["train_clean/loss"]) > 1e-3


def test_without_dropout_the_train_mode_figure_equals_the_clean_one_and_train_mode_false_skips_it():
    torch.manual_seed(0)
    train, val = dataset(40, seed=1), dataset(16, seed=2)
    with_noisy = GapMonitor(num_samples=16)
    trainer(callbacks=[with_noisy]).fit(Net(p=None), *loaders(train, val))
    last = with_noisy.history[-1]
    assert last["train_dropout/loss"] == last["train_clean/loss"]
    assert last["train_dropout/acc"] == last["train_clean/acc"]
    without = GapMonitor(num_samples=16, train_mode=False)
    trainer(callbacks=[without]).fit(Net(p=0.5), *loaders(train, val))
    assert not [k for k in without.history[-1] if k.startswith("train_dropout/")]
    assert {"train_clean/loss", "gap/loss"} <= set(without.history[-1])


EXPECTED_NAMES = {
    "tensor": {"val_loss": "loss", "val_acc": "acc"},
    "metric": {"val_loss": "loss", "val_acc": "acc"},
    "metric_update": {"val_acc": "acc"},
    "log_dict": {"val_loss": "loss", "val_acc": "acc"},
    "collection": {"val_acc": "acc", "val_f1": "f1"},
    "slash": {"val/loss": "loss", "val/acc": "acc"},
    "batch_size": {"val_loss": "batch_mean_loss"},
    "reduce": {
        "val_loss": "loss",
        "val_maxloss": "maxloss",
        "val_sumloss": "sumloss",
        "val_minloss": "minloss",
    },
}


@pytest.mark.parametrize("style", sorted(EXPECTED_NAMES))
def test_every_logging_style_matches_lightnings_own_validation_figures(style):
    """Train data = validation data and a subset covering all of it: train_clean must equal what Lightning
    logged for validation (same batches), the gap must be zero, and both must equal the hand computation."""
    torch.manual_seed(0)
    data = dataset(20, seed=1)
    model = Net(p=0.5, style=style)
    monitor = GapMonitor(num_samples=64, batch_size=7)  # all 20 examples, in the validation loader's batches
    t = trainer(callbacks=[monitor])
    t.fit(model, DataLoader(data, batch_size=7), DataLoader(data, batch_size=7))
    last = monitor.history[-1]
    names = EXPECTED_NAMES[style]
    bases = {metric_base_name(n) for n in names}
    assert {k.split("/", 1)[1] for k in last if k.startswith("train_clean/")} == bases
    hand = by_hand(model, data, torch.arange(20), batch_size=7)
    for logged, hand_key in names.items():
        base = metric_base_name(logged)
        val_value = float(t.callback_metrics[logged])
        assert last[f"train_clean/{base}"] == pytest.approx(val_value, abs=1e-5), base
        assert last[f"gap/{base}"] == pytest.approx(0.0, abs=1e-5), base
        if hand_key in hand:
            assert last[f"train_clean/{base}"] == pytest.approx(hand[hand_key], abs=1e-5), base
        assert f"train_dropout/{base}" in last


def test_batch_size_argument_weighs_batches_as_given_and_defaults_to_the_validation_batch():
    """`log(..., batch_size=1)` makes every batch weigh the same, so the figure shows the monitor's batching:
    with `batch_size=7` the mean of the batch means (7, 7, 7, 7, 2); by default the validation loader's batch
    size (10: 10, 10, 10), not the training loader's (7)."""
    torch.manual_seed(0)
    data = dataset(40, seed=1)
    model = Net(style="batch_size")
    given, default = GapMonitor(num_samples=30, batch_size=7), GapMonitor(num_samples=30)
    trainer(callbacks=[given, default]).fit(
        model, DataLoader(data, batch_size=7), DataLoader(data, batch_size=10)
    )
    chosen = subset(40, 30, seed=0)
    by_7, by_10 = by_hand(model, data, chosen, batch_size=7), by_hand(model, data, chosen, batch_size=10)
    assert abs(by_7["batch_mean_loss"] - by_10["batch_mean_loss"]) > 1e-5  # the batchings are distinguishable
    assert given.history[-1]["train_clean/loss"] == pytest.approx(by_7["batch_mean_loss"], abs=1e-6)
    assert default.history[-1]["train_clean/loss"] == pytest.approx(by_10["batch_mean_loss"], abs=1e-6)


class Augmented(torch.utils.data.Dataset):
    """Random noise added in `__getitem__` from the global RNG, as a training transform would."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + torch.randn_like(x), y


def test_the_subset_is_collated_once_per_fit_so_a_random_transform_is_drawn_once():
    torch.manual_seed(0)
    train, val = dataset(32, seed=1), dataset(16, seed=2)
    model = Net(lr=0.0)  # the weights never change: any change of train_clean comes from the data
    monitor = GapMonitor(num_samples=16)

    def fit(epochs):
        trainer(callbacks=[monitor], max_epochs=epochs).fit(
            model, DataLoader(Augmented(train), batch_size=8, shuffle=True), DataLoader(val, batch_size=8)
        )

    fit(3)
    values = [h["train_clean/loss"] for h in monitor.history]
    assert values[0] == values[1] == values[2]
    plain = by_hand(model, train, subset(32, 16, seed=0), batch_size=16)["loss"]
    assert abs(values[0] - plain) > 1e-4  # the transform was applied (once)
    fit(1)  # a new fit collates the subset again
    assert monitor.history[-1]["train_clean/loss"] != values[0]


@pytest.mark.parametrize("reduce_fx", ["median", torch.median, "std"])
def test_unsupported_reduce_fx_is_refused_by_name(reduce_fx):
    # Lightning itself refuses these in validation_step; the capture must not silently average them.
    capture = LogCapture()
    capture.batch = (torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(DropoutConfigError, match=r"reduce_fx.*but a metric was logged with .*median|std"):
        capture("val_x", torch.tensor(1.0), reduce_fx=reduce_fx)


def test_supported_reduce_fx_spellings_are_accepted():
    capture = LogCapture()
    capture.batch = (torch.zeros(4, 2), torch.zeros(4))
    for fx, name in (("mean", "a"), (torch.mean, "b"), ("sum", "c"), (torch.sum, "d"), (torch.max, "e"),
                     ("min", "f")):  # fmt: skip
        capture(name, 2.0, reduce_fx=fx)
        capture(name, 3.0, reduce_fx=fx)
    assert capture.reduce == {"a": "mean", "b": "mean", "c": "sum", "d": "sum", "e": "max", "f": "min"}
    assert capture.totals["a"] == [20.0, 8.0] and capture.totals["c"][0] == 5.0
    assert capture.totals["e"][0] == 3.0 and capture.totals["f"][0] == 2.0


@pytest.mark.parametrize(
    ("name", "base"),
    [("val_loss", "loss"), ("val/acc", "acc"), ("validation_f1", "f1"), ("valid/auc", "auc"), ("loss", "loss"),
     ("val_", "val_")],
)  # fmt: skip
def test_metric_base_name(name, base):
    assert metric_base_name(name) == base


# ----------------------------------------------------------------------------------------------------------
# GapMonitor / UncertaintyMonitor: training is untouched
# ----------------------------------------------------------------------------------------------------------
class Recorder(Callback):
    """What Lightning reported after each validation and each training epoch, monitor keys left out."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def _take(self, trainer, tag):
        metrics = trainer.callback_metrics
        self.seen.append(
            {"at": tag, **{k: float(v) for k, v in metrics.items() if not k.startswith(MONITOR_PREFIXES)}}
        )

    def on_validation_end(self, trainer, pl_module):
        self._take(trainer, "val")

    def on_train_epoch_end(self, trainer, pl_module):
        self._take(trainer, "epoch")


@pytest.mark.parametrize("dropout_seed", [None, 5], ids=["global-rng", "dropout-seed"])
def test_monitors_do_not_change_training(dropout_seed):
    train, val = dataset(48, seed=1), dataset(16, seed=2)

    def run(monitors):
        torch.manual_seed(0)
        model = Net(p=0.3, style="metric", bn=True)  # nn.Dropout: global RNG
        injector = DropoutInjector(
            rules=[Rule(name="fc2", p=0.4)], dropout_seed=dropout_seed, log_rates=False
        )
        recorder = Recorder()
        t = trainer(callbacks=[injector, *monitors, recorder], max_epochs=2, val_check_interval=0.5)
        t.fit(model, *loaders(train, val, shuffle=True))  # the shuffle draws from the global RNG
        return model, recorder.seen, torch.rand(3)

    plain, plain_seen, plain_next = run([])
    gap, unc = GapMonitor(num_samples=16, train_mode=True), UncertaintyMonitor(n_samples=3)
    watched, watched_seen, watched_next = run([gap, unc])
    assert len(gap.history) == len(unc.history) == 4  # mid-epoch and end-of-epoch validations
    assert any(
        abs(h["train_dropout/loss"] - h["train_clean/loss"]) > 1e-4 for h in gap.history
    )  # it drew masks
    a, b = plain.state_dict(), watched.state_dict()
    assert list(a) == list(b)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed == []  # weights, BatchNorm running stats and num_batches_tracked
    # Lightning's own figures (val_loss, val_acc from the torchmetrics object, train_acc accumulated across the
    # mid-epoch validation) are exactly what they were
    assert watched_seen == plain_seen
    assert torch.equal(plain_next, watched_next)  # and the global RNG ends where it did


class Probe(Callback):
    """Snapshot at on_validation_end of everything the monitors must leave as it was."""

    def __init__(self) -> None:
        self.snapshots: list[dict] = []

    def on_validation_end(self, trainer, pl_module):
        generators = {
            id(m.generator): m.generator
            for m in pl_module.modules()
            if getattr(m, "generator", None) is not None
        }
        metric_state = {
            f"{name}.{key}": getattr(m, key).clone()
            for name, m in pl_module.named_modules()
            if hasattr(m, "_defaults")
            for key in m._defaults
        }
        self.snapshots.append(
            {
                "rng": torch.get_rng_state(),
                "generators": [g.get_state() for g in generators.values()],
                "bn": {k: v.clone() for k, v in pl_module.bn.state_dict().items()},
                "flags": [m.training for m in pl_module.modules()],
                "metrics": metric_state,
                "update_count": {
                    n: m._update_count for n, m in pl_module.named_modules() if hasattr(m, "_defaults")
                },
                "log_shadowed": "log" in pl_module.__dict__,
            }
        )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_extra_passes_restore_rng_generators_batchnorm_flags_and_metric_states():
    torch.manual_seed(0)
    before, after = Probe(), Probe()
    injector = DropoutInjector(rules=[Rule(name="fc2", p=0.5)], dropout_seed=7, log_rates=False)
    monitors = [GapMonitor(num_samples=24), UncertaintyMonitor(n_samples=3)]
    t = trainer(callbacks=[injector, before, *monitors, after], max_epochs=1, val_check_interval=0.5)
    t.fit(Net(p=0.5, style="metric", bn=True), *loaders(dataset(48, 1), dataset(16, 2), shuffle=True))
    assert len(before.snapshots) == 2
    for b, a in zip(before.snapshots, after.snapshots, strict=True):
        assert len(b["generators"]) == 1  # the injector's dropout_seed generator is covered
        for key in b:
            assert _same(b[key], a[key]), key
        assert b["update_count"]["train_acc"] > 0 and not a["log_shadowed"]


# ----------------------------------------------------------------------------------------------------------
# When it runs, where the values go
# ----------------------------------------------------------------------------------------------------------
def test_runs_after_each_validation_of_fit_only_and_reports_its_cost():
    torch.manual_seed(0)
    gap, unc = GapMonitor(num_samples=16), UncertaintyMonitor(n_samples=2, every_n_epochs=2)
    model = Net(p=0.2)
    train_loader, val_loader = loaders(dataset(32, 1), dataset(16, 2))
    t = trainer(callbacks=[gap, unc], max_epochs=3, num_sanity_val_steps=2)  # the sanity check is skipped
    t.fit(model, train_loader, val_loader)
    assert [h["epoch"] for h in gap.history] == [0.0, 1.0, 2.0]
    assert [h["epoch"] for h in unc.history] == [1.0]
    assert gap.seconds > 0
    assert gap.seconds == pytest.approx(sum(h["timing/gap_seconds"] for h in gap.history))
    assert float(t.callback_metrics["timing/gap_seconds"]) == pytest.approx(
        gap.history[-1]["timing/gap_seconds"], rel=1e-6
    )
    t.validate(model, val_loader)
    assert len(gap.history) == 3 and len(unc.history) == 1  # not in trainer.validate


def test_early_stopping_and_model_checkpoint_can_monitor_gap_loss(tmp_path):
    torch.manual_seed(0)
    gap = GapMonitor(num_samples=16)
    stop = EarlyStopping(monitor="gap/loss", mode="min", stopping_threshold=1e9)  # any value stops the fit
    t = trainer(callbacks=[gap, stop], max_epochs=5)
    t.fit(Net(), *loaders(dataset(32, 1), dataset(16, 2)))
    assert len(gap.history) == 1 and t.current_epoch == 1
    gap = GapMonitor(num_samples=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="gap/loss", mode="min", save_top_k=1)
    t = trainer(callbacks=[gap, ckpt], max_epochs=3, enable_checkpointing=True)
    t.fit(Net(), *loaders(dataset(32, 1), dataset(16, 2)))
    assert float(ckpt.best_model_score) == pytest.approx(min(h["gap/loss"] for h in gap.history), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GapMonitor(num_samples=0), r"`num_samples` must be an integer >= 1, but got num_samples=0"),
        (lambda: GapMonitor(num_samples=True), r"`num_samples` must be an integer >= 1"),
        (lambda: GapMonitor(num_samples=2.5), r"`num_samples` must be an integer >= 1"),
        (
            lambda: GapMonitor(batch_size=0),
            r"`batch_size` must be an integer >= 1 or None, but got batch_size=0",
        ),
        (lambda: GapMonitor(batch_size=False), r"`batch_size` must be an integer >= 1 or None"),
        (
            lambda: UncertaintyMonitor(n_samples=1),
            r"`n_samples` must be an integer >= 2, but got n_samples=1",
        ),
        (lambda: UncertaintyMonitor(n_bins=0), r"`n_bins` must be an integer >= 1"),
        (lambda: UncertaintyMonitor(every_n_epochs=0), r"`every_n_epochs` must be an integer >= 1"),
    ],
)
def test_bad_arguments(build, message):
    with pytest.raises(DropoutConfigError, match=message):
        build()


class Stream(IterableDataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return iter(zip(*self.data.tensors, strict=True))


def test_iterable_training_data_gives_a_clear_error():
    train, val = dataset(32, 1), dataset(16, 2)
    with pytest.raises(DropoutConfigError, match=r"map-style training dataset \(with `len`\).*got Stream"):
        trainer(callbacks=[GapMonitor()]).fit(
            Net(), DataLoader(Stream(train), batch_size=8), DataLoader(val, batch_size=8)
        )


def test_uncertainty_monitor_needs_unpackable_batches():
    class DictVal(Net):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch["features"]), batch["label"]))

    class Dicts(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            x, y = self.data[i]
            return {"features": x, "label": y}

    train, val = dataset(32, 1), Dicts(dataset(16, 2))
    with pytest.raises(DropoutConfigError, match=r"`\(input, target\)` batches.*pass `unpack=`"):
        trainer(callbacks=[UncertaintyMonitor()]).fit(
            DictVal(), DataLoader(train, batch_size=8), DataLoader(val, batch_size=8)
        )
    # with unpack= it works
    unc = UncertaintyMonitor(unpack=lambda b: (b["features"], b["label"]))
    trainer(callbacks=[unc]).fit(DictVal(), DataLoader(train, batch_size=8), DataLoader(val, batch_size=8))
    assert set(unc.history[-1]) == {"epoch", "mc/ece", "mc/ece_no_dropout", "mc/entropy", "mc/accuracy"}


# ----------------------------------------------------------------------------------------------------------
# UncertaintyMonitor: the figures
# ----------------------------------------------------------------------------------------------------------
class RngAtValidationEnd(Callback):
    def on_validation_end(self, trainer, pl_module):
        self.state = torch.get_rng_state()


@torch.no_grad()
def mc_by_hand(model: Net, loader: DataLoader, n_samples: int, rng_state: torch.Tensor, n_bins: int = 15):
    """MC dropout by hand: eval mode, only `model.drop` switched on, the RNG where the monitor found it."""
    torch.set_rng_state(rng_state)
    model.eval()
    ece_mc = MulticlassCalibrationError(CLASSES, n_bins=n_bins)
    ece_det = MulticlassCalibrationError(CLASSES, n_bins=n_bins)
    entropy, correct, count, det_entropy = 0.0, 0, 0, 0.0
    for x, y in loader:
        det = model(x).softmax(-1)
        model.drop.train()
        probs = torch.stack([model(x).softmax(-1) for _ in range(n_samples)]).mean(0)
        model.drop.eval()
        ece_mc.update(probs, y)
        ece_det.update(det, y)
        entropy += float(-(probs * probs.log()).sum(-1).sum())
        det_entropy += float(-(det * det.log()).sum(-1).sum())
        correct += int((probs.argmax(-1) == y).sum())
        count += len(y)
    return {
        "mc/ece": float(ece_mc.compute()),
        "mc/ece_no_dropout": float(ece_det.compute()),
        "mc/entropy": entropy / count,
        "mc/accuracy": correct / count,
        "det_entropy": det_entropy / count,
    }


@pytest.mark.parametrize("p", [None, 0.5], ids=["no-dropout", "dropout"])
def test_uncertainty_figures_equal_a_hand_computation_with_the_same_passes(p):
    torch.manual_seed(0)
    model = Net(p=p)
    rng, unc = RngAtValidationEnd(), UncertaintyMonitor(n_samples=4, n_bins=10)
    t = trainer(callbacks=[rng, unc])
    t.fit(model, *loaders(dataset(48, 1), dataset(40, 2)))
    got = unc.history[-1]
    hand = mc_by_hand(model, t.val_dataloaders, 4, rng.state, n_bins=10)
    for key in ("mc/ece", "mc/ece_no_dropout", "mc/entropy", "mc/accuracy"):
        assert got[key] == pytest.approx(hand[key], abs=1e-5), key
    assert 0.0 <= got["mc/ece"] <= 1.0 and 0.0 <= got["mc/entropy"] <= math.log(CLASSES) + 1e-6
    if p is None:  # MC average of identical passes = the deterministic prediction
        assert got["mc/ece"] == pytest.approx(got["mc/ece_no_dropout"], abs=1e-6)
        assert got["mc/entropy"] == pytest.approx(hand["det_entropy"], abs=1e-5)
    else:
        assert abs(got["mc/entropy"] - hand["det_entropy"]) > 1e-4


# ----------------------------------------------------------------------------------------------------------
# TensorBoard: tags and the custom-scalars layout
# ----------------------------------------------------------------------------------------------------------
class Deep(L.LightningModule):
    """An input layer and 6 blocks of two Linear layers: 13 sites with the rules below."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 16)}) for _ in range(6)
        )
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for layer in self.layers:
            h = torch.relu(layer["b"](torch.relu(layer["a"](h))))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def read_events(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(directory.rglob("events.out.tfevents*"))
    accumulator = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return files, accumulator


def test_tensorboard_gets_monitor_and_dropout_tags_and_a_custom_scalars_layout(tmp_path):
    torch.manual_seed(0)
    injector = DropoutInjector(
        rules=[Rule(match=nn.Linear, name="layers.*", p=0.2), Rule(name="inp", variant="concrete", p=0.3)],
        track_drop_fraction=True,
    )
    gap, unc = GapMonitor(num_samples=16), UncertaintyMonitor(n_samples=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    t = trainer(callbacks=[injector, gap, unc], logger=logger, log_every_n_steps=1, max_epochs=2)
    t.fit(Deep(), *loaders(dataset(32, 1), dataset(16, 2)))
    files, events = read_events(tmp_path)
    assert len(files) == 1
    tags = set(events.Tags()["scalars"])
    keys = [site_name(s.key) for s in injector.plan]
    stacked = [k for k in keys if k.startswith("layers.")]
    assert len(stacked) == 12 and "inp.output" in keys
    expected = {f"{kind}/{m}" for kind in ("gap", "train_clean", "train_dropout") for m in ("loss", "acc")}
    expected |= {
        "timing/gap_seconds",
        "mc/ece",
        "mc/ece_no_dropout",
        "mc/entropy",
        "mc/accuracy",
        "dropout/mean_rate",
    }
    expected |= {f"dropout/rate/{k}" for k in stacked} | {f"dropout/fraction/{k}" for k in stacked}
    expected |= {"dropout/learned/inp.output"}
    assert expected <= tags, sorted(expected - tags)
    assert "dropout/rate/inp.output" not in tags  # the learned rate has its own tag
    assert not [t for t in tags if ":" in t]  # no plan key (`fc1:output`) in a logged key: MLflow refuses `:`
    logged = [e.value for e in events.Scalars("gap/loss")]
    assert logged == pytest.approx([h["gap/loss"] for h in gap.history], rel=1e-5)
    # the custom-scalars layout: one chart per quantity and group of sites; its regexes cover the sites
    groups = site_groups(stacked)
    assert groups == {
        "layers.#.a.output": [f"layers.{i}.a.output" for i in range(6)],
        "layers.#.b.output": [f"layers.{i}.b.output" for i in range(6)],
    }
    layout = last_layout(events)  # TensorBoard shows a run's last layout: it holds every callback's charts
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert [cat.title for cat in layout.category] == ["dropout", "val vs train"]
    assert {"rate: layers.#.a.output", "rate: layers.#.b.output", "learned rate: all sites"} <= set(charts)
    for quantity, label in (("rate", "rate"), ("fraction", "dropped fraction")):
        for group, members in groups.items():
            regexes = charts[f"{label}: {group}"]
            for tag in tags:
                hit = any(re.fullmatch(rx, tag) for rx in regexes)
                assert hit == (tag in {f"dropout/{quantity}/{k}" for k in members}), (group, tag)
    assert any(re.fullmatch(rx, "dropout/learned/inp.output") for rx in charts["learned rate: all sites"])
    # the GapMonitor's overlay: per metric, validation, clean training and dropout-on training on one chart
    for base in ("loss", "acc"):
        regexes = charts[f"{base}: val, train_clean, train_dropout"]
        drawn = {tag for tag in tags if any(re.fullmatch(rx, tag) for rx in regexes)}
        assert drawn == {f"val_{base}", f"train_clean/{base}", f"train_dropout/{base}"}, base


def last_layout(events: Any) -> Any:
    from tensorboard.plugins.custom_scalar import layout_pb2

    config = events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    return layout_pb2.Layout.FromString(config)


def test_named_injectors_and_the_gap_monitor_share_one_custom_scalars_layout(tmp_path):
    """Each callback adds its charts to the run's layout: two named injectors (and the GapMonitor) do not
    overwrite each other's (TensorBoard shows only a run's last layout)."""
    torch.manual_seed(0)
    first = DropoutInjector(rules=[Rule(name="layers.0.a", p=0.2)], name="first")
    second = DropoutInjector(rules=[Rule(name="layers.1.a", p=0.3)], name="second")
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    t = trainer(callbacks=[first, second, GapMonitor(num_samples=8)], logger=logger, max_epochs=1)
    t.fit(Deep(), *loaders(dataset(16, 1), dataset(8, 2)))
    _, events = read_events(tmp_path)
    layout = last_layout(events)
    charts = {cat.title: {c.title: list(c.multiline.tag) for c in cat.chart} for cat in layout.category}
    assert set(charts) == {"dropout/first", "dropout/second", "val vs train"}
    assert charts["dropout/first"]["rate: all sites"] == [re.escape("dropout/rate/layers.0.a.output")]
    assert charts["dropout/second"]["rate: all sites"] == [re.escape("dropout/rate/layers.1.a.output")]
    assert "acc: val, train_clean, train_dropout" in charts["val vs train"]


# ----------------------------------------------------------------------------------------------------------
# Known problem: side effects of validation_step on the module
# ----------------------------------------------------------------------------------------------------------
class CollectsOutputs(Net):
    """Lightning 2's recommended pattern: validation_step appends, on_validation_epoch_end uses and clears."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []
        self.epoch_sizes: list[int] = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.outputs.append(loss)
        self.log("val_loss", loss)
        return loss

    def on_validation_epoch_end(self):
        self.epoch_sizes.append(len(self.outputs))
        self.log("val_mean_of_outputs", torch.stack(self.outputs).mean())
        self.outputs.clear()


def test_validation_step_side_effects_do_not_leak_into_the_next_validation():
    torch.manual_seed(0)
    model = CollectsOutputs()
    trainer(callbacks=[GapMonitor(num_samples=16)], max_epochs=2).fit(
        model, *loaders(dataset(32, 1), dataset(16, 2))
    )
    assert model.epoch_sizes == [2, 2]  # two validation batches per epoch, nothing else
    assert model.outputs == []


class LogsNumpy(Net):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", np.float32((logits.argmax(-1) == y).float().mean().item()))  # Lightning takes it


def test_numpy_scalars_are_monitored_like_lightning_logs_them():
    torch.manual_seed(0)
    data = dataset(20, seed=1)
    monitor = GapMonitor(num_samples=20)
    t = trainer(callbacks=[monitor])
    t.fit(LogsNumpy(), DataLoader(data, batch_size=7), DataLoader(data, batch_size=7))
    assert "val_acc" in t.callback_metrics  # Lightning logged it
    assert monitor.history[-1]["train_clean/acc"] == pytest.approx(
        float(t.callback_metrics["val_acc"]), abs=1e-6
    )


# ----------------------------------------------------------------------------------------------------------
# DDP: 2 processes (gloo) log what 1 process logs; one event file
# ----------------------------------------------------------------------------------------------------------
def _load_script():
    spec = importlib.util.spec_from_file_location("ddp_gap", HERE / "scripts" / "ddp_gap.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ddp_two_processes_log_the_single_process_figures_once(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    result = subprocess.run(
        [sys.executable, str(HERE / "scripts" / "ddp_gap.py"), str(two), "2"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=HERE.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _load_script().main(one, 1)  # the same script with devices=1, in this process
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((one / "rank0.json").read_text())
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert ranks[0]["weights_unchanged"] and single["weights_unchanged"]
    # every rank holds the reduced values, and they are the single-process ones
    drop_seconds = [
        [{k: v for k, v in h.items() if k != "timing/gap_seconds"} for h in r["history"]] for r in ranks
    ]
    assert drop_seconds[0] == drop_seconds[1]
    keys = [k for k in single["history"][0] if k.startswith(("train_clean/", "gap/"))]
    assert {"train_clean/loss", "train_clean/acc", "train_clean/maxloss", "train_clean/sumloss", "gap/loss",
            "gap/acc"} <= set(keys)  # fmt: skip
    assert len(ranks[0]["history"]) == len(single["history"]) == 2
    for got, want in zip(ranks[0]["history"], single["history"], strict=True):
        for key in keys:  # (train_dropout differs: each rank draws its own masks)
            assert got[key] == pytest.approx(want[key], abs=1e-5), key
    # rank 0 alone wrote: one event file, holding the reduced values
    files = sorted(two.rglob("events.out.tfevents*"))
    assert len(files) == 1, files
    _, events = read_events(two)
    logged = [e.value for e in events.Scalars("train_clean/loss")]
    assert logged == pytest.approx([h["train_clean/loss"] for h in single["history"]], abs=1e-5)


def test_the_former_path_of_uncertainty_monitor_still_imports_with_a_deprecation_warning():
    import lightning_dropout.monitor as monitor
    from lightning_dropout.uncertainty import UncertaintyMonitor as moved

    with pytest.warns(DeprecationWarning, match="lightning_dropout.uncertainty.UncertaintyMonitor"):
        assert monitor.UncertaintyMonitor is moved
    assert "UncertaintyMonitor" not in monitor.__all__
    with pytest.raises(AttributeError):
        monitor.NoSuchMonitor  # noqa: B018


def test_gaps_at_gives_one_validations_gaps_by_metric_name():
    monitor = GapMonitor(8)
    monitor.history = [
        {"epoch": 0.0, "train_clean/loss": 0.5, "gap/loss": 0.1, "gap/acc": -0.02, "timing/gap_seconds": 0.3},
        {"epoch": 1.0, "train_clean/loss": 0.4, "gap/loss": 0.2},
    ]
    assert monitor.gaps_at(0) == {"loss": 0.1, "acc": -0.02}  # neither the timing nor the clean values
    assert monitor.gaps_at(1) == {"loss": 0.2} and monitor.gaps_at(-1) == {"loss": 0.2}
    assert monitor.gaps_at(2) == {}
