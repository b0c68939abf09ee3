"""The prepared GPU check (issue 13): what only a CUDA device exercises. Every test is marked ``cuda`` and skips
without CUDA; ``benchmarks/gpu_check.sh`` runs them (``python -m pytest -m cuda``).

* weight dropout on a cuDNN LSTM: the dropped weights go into ``_flat_weights`` for one call while the
  parameters stay in cuDNN's single flat buffer;
* ``bf16-mixed`` training with injected sites (autocast reaches every site, the variants keep its dtype);
* the ``GapMonitor``'s extra passes fork the CUDA generator (training is unchanged by the monitor);
* MC dropout on CUDA (attention, stacked-RNN and Transformer dropout sample; BatchNorm stays in eval).

``LIGHTNING_DROPOUT_TEST_DEVICE=cpu`` runs the same checks on the CPU (a dry run of the logic on a machine
without a GPU; the cuDNN-only assertions are then left out).
"""

from __future__ import annotations

import copy
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout import Rule, inject
from lightning_dropout.callback import DropoutInjector
from lightning_dropout.mc import mc_predict
from lightning_dropout.monitor import GapMonitor
from lightning_dropout.variants import DropoutVariant, WeightDropout

DEVICE = os.environ.get("LIGHTNING_DROPOUT_TEST_DEVICE", "cuda")
CUDA = DEVICE == "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def fit_trainer(**kwargs) -> L.Trainer:
    return trainer(**{"accelerator": "gpu" if CUDA else "cpu", "max_epochs": 2, **kwargs})


def data(n: int, seed: int, features: int = 16, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))


# ----------------------------------------------------------------------------------------------------------
# Weight dropout on a cuDNN LSTM (the `_flat_weights` path)
# ----------------------------------------------------------------------------------------------------------
def _flat_weights_are_parameters(lstm: nn.RNNBase) -> bool:
    return all(
        w is lstm._parameters[n] for w, n in zip(lstm._flat_weights, lstm._flat_weights_names, strict=True)
    )


def _one_flat_buffer(lstm: nn.RNNBase) -> bool:
    """cuDNN's layout: every weight a view into one storage (``flatten_parameters``)."""
    return len({w.untyped_storage().data_ptr() for w in lstm._flat_weights}) == 1


@pytest.mark.parametrize("moved", ["before", "after"], ids=["inject-then-move", "move-then-inject"])
def test_weight_dropout_on_a_cudnn_lstm(moved):
    torch.manual_seed(0)
    root = nn.Module()
    root.lstm = nn.LSTM(4, 8, num_layers=2)
    plain = copy.deepcopy(root.lstm).to(DEVICE)
    rule = Rule(name="lstm", variant="weight", p=0.5, exclude_output_layer=False)
    if moved == "after":
        root.to(DEVICE)
    plan = inject(root, rule)
    if moved == "before":
        root.to(DEVICE)
    assert plan["lstm:weight"].params == {"weights": ["weight_hh_l0", "weight_hh_l1"]}
    lstm = root.lstm
    weights = [lstm.weight_hh_l0, lstm.weight_hh_l1]
    if CUDA:
        assert torch.backends.cudnn.is_acceptable(lstm.weight_hh_l0) and _one_flat_buffer(lstm)
    x = torch.randn(5, 3, 4, device=DEVICE)
    lstm.eval()
    torch.testing.assert_close(lstm(x)[0], plain(x)[0])
    lstm.train()
    first, second = lstm(x)[0], lstm(x)[0]
    assert first.device.type == DEVICE
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, plain(x)[0])
    # after each call the parameters are back in `_flat_weights`, and still in one flat buffer
    assert _flat_weights_are_parameters(lstm)
    assert lstm.weight_hh_l0 is weights[0] and lstm.weight_hh_l1 is weights[1]
    (first.sum() + second.sum()).backward()
    for weight in (*weights, lstm.weight_ih_l0):
        assert weight.grad is not None and bool(weight.grad.abs().sum() > 0)
    torch.optim.SGD(lstm.parameters(), lr=0.1).step()
    if CUDA:
        assert _one_flat_buffer(lstm)  # the optimizer updated the buffer in place: no re-flattening needed
    lstm.eval()
    assert torch.equal(lstm(x)[0], lstm(x)[0])  # eval: the parameters as they are, no mask


def test_weight_dropout_with_a_device_generator_is_reproducible():
    torch.manual_seed(0)
    root = nn.Module()
    root.lstm = nn.LSTM(4, 8)
    inject(root, Rule(name="lstm", variant="weight", p=0.5, exclude_output_layer=False))
    root.to(DEVICE).train()
    (drop,) = [m for m in root.modules() if isinstance(m, WeightDropout)]
    drop.generator = torch.Generator(device=DEVICE)
    x = torch.randn(5, 3, 4, device=DEVICE)

    def run(seed: int) -> torch.Tensor:
        drop.generator.manual_seed(seed)
        return root.lstm(x)[0]

    torch.testing.assert_close(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    assert _flat_weights_are_parameters(root.lstm)


class LSTMNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 4)
        self.example_input_array = torch.zeros(2, 16)

    def forward(self, x):
        return self.head(self.lstm(x.unsqueeze(-1))[0][:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_weight_dropout_on_a_cudnn_lstm_through_the_callback():
    torch.manual_seed(0)
    model = LSTMNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    injector = DropoutInjector(rules=[Rule(name="lstm", variant="weight", p=0.3)], dropout_seed=5)
    t = fit_trainer(callbacks=[injector])
    t.fit(model, DataLoader(data(64, 0), batch_size=16))
    assert [s.key for s in injector.plan] == ["lstm:weight"]
    lstm = model.lstm
    assert lstm.weight_hh_l0.device.type == DEVICE
    assert _flat_weights_are_parameters(lstm)
    if CUDA:
        assert _one_flat_buffer(lstm)
    after = model.state_dict()
    assert list(after) == list(before)  # no parameter renamed or re-registered
    for name in ("lstm.weight_hh_l0", "lstm.weight_hh_l1", "lstm.weight_ih_l0"):
        assert not torch.equal(after[name].cpu(), before[name]), name  # trained through the dropped weights


# ----------------------------------------------------------------------------------------------------------
# bf16-mixed training with injected sites
# ----------------------------------------------------------------------------------------------------------
class ConvNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)
        self.example_input_array = torch.zeros(2, 16)
        self.losses: list[float] = []

    def forward(self, x):
        h = self.conv(x.unsqueeze(1)).relu()
        h = self.fc1(h.flatten(1)).relu()
        h = self.fc2(h).relu()
        h = self.fc3(h).relu()
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class SiteDtypes(Callback):
    """The dtypes each injected site sees and returns in training steps."""

    def __init__(self) -> None:
        self.seen: dict[str, set[tuple[torch.dtype, torch.dtype]]] = {}

    def on_fit_start(self, trainer, pl_module):
        for name, module in pl_module.named_modules():
            if isinstance(module, DropoutVariant) and not isinstance(module, WeightDropout):
                module.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args, output):
            if module.training:
                self.seen.setdefault(name, set()).add((args[0].dtype, output.dtype))

        return hook


class LearnedRate(Callback):
    """The concrete site's ``p_logit`` when training starts."""

    def on_fit_start(self, trainer, pl_module):
        (p_logit,) = [p for n, p in pl_module.named_parameters() if n.endswith("p_logit")]
        self.start = p_logit.detach().clone()


def test_bf16_mixed_training_with_injected_sites():
    torch.manual_seed(0)
    model = ConvNet()
    rules = [
        Rule(name="conv", variant="dropblock", p=0.2, params={"block_size": 3}),
        Rule(name="fc1", variant="gaussian", p=0.2),
        Rule(name="fc2", variant="concrete", p=0.2),
        Rule(name="fc3", variant="standard", p=0.2),
        Rule(name="fc3", variant="weight", p=0.2),
    ]
    injector = DropoutInjector(rules=rules, dropout_seed=3)
    dtypes, learned = SiteDtypes(), LearnedRate()
    t = fit_trainer(callbacks=[injector, dtypes, learned], precision="bf16-mixed", log_every_n_steps=1)
    t.fit(model, DataLoader(data(64, 0), batch_size=16, shuffle=True))
    assert {s.key for s in injector.plan} == {
        "conv:output",
        "fc1:output",
        "fc2:output",
        "fc3:output",
        "fc3:weight",
    }
    assert len(model.losses) == 8 and all(torch.isfinite(torch.tensor(model.losses)))
    (p_logit,) = [p for n, p in model.named_parameters() if n.endswith("p_logit")]
    assert p_logit.device.type == DEVICE and p_logit.dtype == torch.float32
    assert not torch.equal(p_logit.detach(), learned.start)  # the learned rate was trained under autocast
    assert injector._generator is not None and injector._generator.device.type == DEVICE
    # autocast reached every output site (bf16 activations) and each returned the dtype it was given
    assert set(dtypes.seen) == {"conv.ld_output", "fc1.ld_output", "fc2.ld_output", "fc3.ld_output"}, (
        dtypes.seen
    )
    for name, pairs in dtypes.seen.items():
        assert pairs == {(torch.bfloat16, torch.bfloat16)}, (name, pairs)


# ----------------------------------------------------------------------------------------------------------
# GapMonitor: the extra passes fork the CUDA generator
# ----------------------------------------------------------------------------------------------------------
class DropNet(L.LightningModule):
    """``nn.Dropout`` and an injected site, both drawing from the device's global generator."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.fc2(self.drop(self.fc1(x).relu())).relu())

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _rng_state() -> torch.Tensor:
    return torch.cuda.get_rng_state() if CUDA else torch.get_rng_state()


def test_gap_monitor_forks_the_cuda_generator():
    train, val = data(48, 1), data(16, 2)

    def run(monitors):
        torch.manual_seed(0)  # seeds the CUDA generators too
        model = DropNet()
        injector = DropoutInjector(rules=[Rule(name="fc2", p=0.4)], log_rates=False)  # global generator
        t = fit_trainer(callbacks=[injector, *monitors], val_check_interval=0.5)
        t.fit(model, DataLoader(train, batch_size=8), DataLoader(val, batch_size=8))
        return {k: v.cpu() for k, v in model.state_dict().items()}, _rng_state()

    plain, plain_rng = run([])
    gap = GapMonitor(num_samples=16, train_mode=True)
    watched, watched_rng = run([gap])
    assert len(gap.history) == 4  # mid-epoch and end-of-epoch validations, each with dropout passes
    assert any(abs(h["train_dropout/loss"] - h["train_clean/loss"]) > 1e-4 for h in gap.history)
    assert torch.equal(plain_rng, watched_rng)  # the device generator ends where it did without the monitor
    assert list(plain) == list(watched)
    for key in plain:  # and training drew the same masks (floating-point noise of the device aside)
        torch.testing.assert_close(plain[key], watched[key], msg=key)


# ----------------------------------------------------------------------------------------------------------
# MC dropout on CUDA
# ----------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, dropout=0.3, batch_first=True)
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.norm(self.attn(x, x, x, need_weights=False)[0].mean(1))


class StackedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(16, 16, num_layers=2, dropout=0.3, batch_first=True)
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.norm(self.gru(x)[0][:, -1])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.norm(self.encoder(x).mean(1))


class Injected(nn.Module):
    """No dropout of its own: injected standard, gaussian and variational sites."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.gru(x)[0][:, -1]
        return self.norm(self.head(self.fc2(self.fc1(h).relu()).relu()))


def _injected() -> nn.Module:
    model = Injected()
    inject(
        model,
        [
            Rule(name="gru", variant="variational", p=0.3),
            Rule(name="fc1", variant="standard", p=0.3),
            Rule(name="fc2", variant="gaussian", p=0.3),
        ],
        example_input=torch.zeros(2, 5, 16),
    )
    return model


@pytest.mark.parametrize(
    "build",
    [Attention, StackedGRU, Encoder, _injected],
    ids=["attention", "stacked-gru", "transformer", "injected"],
)
def test_mc_dropout_on_cuda(build):
    torch.manual_seed(0)
    model = build().to(DEVICE)
    x = torch.randn(6, 5, 16, device=DEVICE)
    model.train()
    for _ in range(3):  # BatchNorm gets running statistics that differ from the initial ones
        model(x)
    model.eval()
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    stats = {k: v.clone() for k, v in norm.state_dict().items()}
    flags = [m.training for m in model.modules()]
    reference = model(x)
    torch.testing.assert_close(model(x), reference)  # eval: deterministic (the fast paths where they apply)
    pred = mc_predict(model, x, n_samples=8, keep_samples=True)
    assert pred.samples is not None and pred.samples.device.type == DEVICE
    assert pred.samples.shape == (8, *reference.shape)
    assert all(
        not torch.allclose(pred.samples[0], s) for s in pred.samples[1:]
    )  # every pass drew its own masks
    assert bool(pred.std.mean() > 0)
    assert all(torch.equal(v, stats[k]) for k, v in norm.state_dict().items())  # BatchNorm stayed in eval
    assert [m.training for m in model.modules()] == flags
    torch.testing.assert_close(model(x), reference)
