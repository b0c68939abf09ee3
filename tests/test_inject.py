"""Behaviour of the injection engine: rules -> plan -> sites on real torch modules, undo, describe, errors."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lightning_dropout import (
    DropoutConfigError,
    DropoutPlan,
    Rule,
    Site,
    applied_plan,
    apply_plan,
    describe,
    format_sites,
    inject,
    output_layer,
    resolve,
    site_handles,
    undo,
)
from lightning_dropout.inject import is_dropout_module, regularization
from lightning_dropout.variants import ConcreteDropout, DropoutVariant, GaussianDropout, WeightDropout


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models on a shared machine: one intra-op thread is ~10x faster than contended threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, PackedSequence):
        return value.data
    if isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    return None


def seen_shapes(model: nn.Module, x: Any) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Input and output shapes of every named module for one eval forward (first call wins)."""
    names: dict[int, str] = {}
    for name, mod in model.named_modules():
        names.setdefault(id(mod), name)
    ins: dict[str, tuple] = {}
    outs: dict[str, tuple] = {}

    def pre(mod: nn.Module, args: tuple) -> None:
        t = first_tensor(args)
        if t is not None:
            ins.setdefault(names[id(mod)], tuple(t.shape))

    def post(mod: nn.Module, args: tuple, out: Any) -> None:
        t = first_tensor(out)
        if t is not None:
            outs.setdefault(names[id(mod)], tuple(t.shape))

    handles = [
        h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))
    ]
    model.eval()
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


def seeded(fn: Callable[[], Tensor], seed: int = 0) -> Tensor:
    torch.manual_seed(seed)
    return fn()


# ----------------------------------------------------------------------------------------------------------
# Model zoo
# ----------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


class CNN2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class RNNNet(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], num_layers: int, batch_first: bool) -> None:
        super().__init__()
        self.rnn = cell(4, 8, num_layers=num_layers, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.rnn(x)
        return self.head(y)


class TransformerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(6, 12), nn.ReLU()), nn.Sequential(nn.Linear(12, 12), nn.ReLU())]
        )
        self.heads = nn.ModuleDict({"a": nn.Linear(12, 2), "b": nn.Linear(12, 2)})

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return torch.cat([self.heads["a"](x), self.heads["b"](x)], dim=-1)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    rules: Callable[[], list[Rule]]

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build()

    def example(self) -> Tensor:
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(123))


def _rnn_case(cell: type[nn.RNNBase], layers: int, batch_first: bool) -> Case:
    def rules() -> list[Rule]:
        out = [
            Rule(match=cell, variant="variational", p=0.5, where="both"),
            Rule(match=cell, variant="weight", p=0.3),
        ]
        if layers > 1:
            out.append(Rule(replace=True, p=0.3))  # the float dropout between stacked layers
        return out

    return Case(lambda: RNNNet(cell, layers, batch_first), (3, 5, 4) if batch_first else (5, 3, 4), rules)


ZOO: dict[str, Case] = {
    "mlp": Case(MLP, (4, 6), lambda: [Rule(match=nn.Linear, p=0.5)]),
    "mlp_sequential": Case(
        lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)),
        (4, 6),
        lambda: [Rule(match=nn.Linear, p=0.5), Rule(match=nn.ReLU, variant="gaussian", p=0.3)],
    ),
    "cnn1d": Case(
        lambda: nn.Sequential(
            nn.Conv1d(2, 8, 3),
            nn.ReLU(),
            nn.Conv1d(8, 8, 3),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        (4, 2, 12),
        lambda: [Rule(match=nn.Conv1d, variant="spatial", p=0.5)],
    ),
    "cnn2d_bn": Case(
        CNN2d,
        (4, 1, 8, 8),
        lambda: [
            Rule(name="act*", variant="spatial", p=0.5),
            Rule(name="conv2", variant="dropblock", p=0.3, params={"block_size": 3}),
        ],
    ),
    **{
        f"{cell.__name__.lower()}_l{layers}_{'bf' if bf else 'tf'}": _rnn_case(cell, layers, bf)
        for cell in (nn.LSTM, nn.GRU)
        for layers in (1, 2)
        for bf in (True, False)
    },
    "transformer": Case(
        TransformerNet,
        (2, 5, 8),
        lambda: [
            Rule(match=nn.Linear, p=0.5),
            Rule(match=nn.TransformerEncoderLayer, variant="attention", p=0.3),
        ],
    ),
    "nested": Case(
        Nested,
        (4, 6),
        lambda: [
            Rule(regex=r"blocks\.\d+", p=0.5),
            Rule(name="heads.a", variant="gaussian", p=0.3),
        ],
    ),
}


@dataclass
class Injected:
    case: Case
    plain: nn.Module
    model: nn.Module
    plan: DropoutPlan
    x: Tensor


@pytest.fixture(params=list(ZOO), ids=list(ZOO))
def injected(request: pytest.FixtureRequest) -> Injected:
    case = ZOO[request.param]
    plain = case.make()
    model = copy.deepcopy(plain)
    x = case.example()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of the zoo rule sets should warn
        plan = inject(model, case.rules(), example_input=x)
    assert len(plan) > 0
    return Injected(case, plain, model, plan, x)


def test_zoo_state_dict_keys_unchanged_and_load_into_plain_model(injected: Injected) -> None:
    keys = list(injected.plain.state_dict())
    assert list(injected.model.state_dict()) == keys
    fresh = injected.case.make(seed=1)
    fresh.load_state_dict(injected.model.state_dict(), strict=True)
    injected.model.load_state_dict(injected.plain.state_dict(), strict=True)
    fresh.eval()
    injected.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(injected.x), injected.model(injected.x))


def test_zoo_eval_output_equals_plain_model(injected: Injected) -> None:
    injected.model.eval()
    injected.plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(injected.model(injected.x), injected.plain(injected.x))
    # grad mode (torch's Transformer takes another path with grad on)
    torch.testing.assert_close(injected.model(injected.x), injected.plain(injected.x))


def test_zoo_dropout_is_active_in_training(injected: Injected) -> None:
    model, plain, x = injected.model, injected.plain, injected.x
    model.train()
    plain.train()
    with torch.no_grad():
        torch.testing.assert_close(
            seeded(lambda: plain(x)), seeded(lambda: plain(x), 1)
        )  # plain: deterministic
        train_out = seeded(lambda: model(x))
        assert not torch.allclose(train_out, plain(x))
        assert not torch.allclose(train_out, seeded(lambda: model(x), 1))
        model.eval()
        assert not torch.allclose(train_out, model(x))


def test_zoo_applying_the_same_plan_twice_changes_nothing(injected: Injected) -> None:
    model = injected.model
    before = (repr(model), hook_count(model), list(model.state_dict()), applied_plan(model))
    assert before[3] == injected.plan
    assert apply_plan(model, injected.plan) == injected.plan
    assert (repr(model), hook_count(model), list(model.state_dict()), applied_plan(model)) == before
    assert inject(model, plan=injected.plan, example_input=injected.x) == injected.plan
    assert (repr(model), hook_count(model), list(model.state_dict()), applied_plan(model)) == before
    # resolving the same rules again on the injected model looks through the sites already there
    assert inject(model, injected.case.rules(), example_input=injected.x) == injected.plan
    assert (repr(model), hook_count(model), list(model.state_dict()), applied_plan(model)) == before


def test_zoo_undo_restores_the_original_module_tree(injected: Injected) -> None:
    model, plain, x = injected.model, injected.plain, injected.x
    assert repr(model) != repr(plain)
    undo(model)
    assert repr(model) == repr(plain)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    assert not any("ld_" in n for n, _ in model.named_modules())
    assert not any(isinstance(m, DropoutVariant) for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert applied_plan(model) == DropoutPlan()
    assert site_handles(model) == []
    assert list(model.state_dict()) == list(plain.state_dict())
    for name, mod in model.named_modules():
        if isinstance(mod, nn.RNNBase):
            assert mod.dropout == plain.get_submodule(name).dropout
            assert all(
                w is getattr(mod, n) for w, n in zip(mod._flat_weights, mod._flat_weights_names, strict=True)
            )
        if isinstance(mod, nn.MultiheadAttention):
            assert mod.dropout == plain.get_submodule(name).dropout
    model.train()
    plain.train()
    torch.testing.assert_close(seeded(lambda: model(x)), seeded(lambda: plain(x)))
    undo(model)  # undoing twice is harmless
    assert repr(model) == repr(plain)


def test_zoo_describe_lists_every_site_with_the_shape_it_sees(injected: Injected) -> None:
    model, plan, x = injected.model, injected.plan, injected.x
    ins, outs = seen_shapes(copy.deepcopy(injected.plain), x)
    rows = describe(model, x)
    assert [r.key for r in rows] == [s.key for s in plan]
    for row in rows:
        site = plan[row.key]
        assert row.target == site.target
        assert row.module_type == type(injected.plain.get_submodule(site.target)).__name__
        assert (row.where, row.variant, row.p, row.params) == (
            site.where,
            site.variant,
            site.p,
            dict(site.params),
        )
        expected = (ins if site.where in ("input", "replace") else outs)[site.target]
        assert row.shape == expected
    assert all(r.shape is None for r in describe(model))
    table = format_sites(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["site", "module", "variant", "p", "params", "shape"]
    assert len(lines) == len(rows) + 1
    for row, line in zip(rows, lines[1:], strict=True):
        assert line.startswith(row.key)
        assert row.module_type in line and row.variant in line and f"{row.p:.3g}" in line
        assert "x".join(map(str, row.shape)) in line


def test_zoo_backward_reaches_user_parameters(injected: Injected) -> None:
    model, x = injected.model, injected.x
    model.train()
    torch.manual_seed(0)
    model(x).pow(2).sum().backward()
    names = [n for n, _ in injected.plain.named_parameters()]
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(names)
    for name in names:
        grad = params[name].grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
    assert any(bool(params[n].grad.abs().sum() > 0) for n in names)


# ----------------------------------------------------------------------------------------------------------
# 2. the output layer
# ----------------------------------------------------------------------------------------------------------
class HeadFirst(nn.Module):
    """The output layer is defined first in __init__ but runs last."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_output_layer_is_excluded_by_default() -> None:
    model = MLP()
    assert output_layer(model) == "out"
    assert [s.key for s in resolve(model, [Rule(match=nn.Linear, p=0.2)])] == ["fc1:output", "fc2:output"]
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [s.key for s in inject(seq, Rule(match=nn.Linear, p=0.2))] == ["0:output"]
    assert not hasattr(seq[2], "ld_output")


def test_output_layer_included_when_asked() -> None:
    model = MLP()
    plan = inject(model, Rule(match=nn.Linear, p=0.2, exclude_output_layer=False))
    assert [s.key for s in plan] == ["fc1:output", "fc2:output", "out:output"]
    assert isinstance(model.out.ld_output, DropoutVariant)


def test_output_layer_found_by_execution_order_with_example_input() -> None:
    model = HeadFirst()
    x = torch.randn(3, 4)
    assert output_layer(model) == "fc2"  # definition order
    assert output_layer(model, x) == "head"  # execution order
    plan = inject(model, Rule(match=nn.Linear, p=0.2), example_input=x)
    assert [s.key for s in plan] == ["fc1:output", "fc2:output"]
    assert not hasattr(model.head, "ld_output")


# ----------------------------------------------------------------------------------------------------------
# 3. recurrent modules
# ----------------------------------------------------------------------------------------------------------
def _capture(module: nn.Module) -> dict[str, Any]:
    """Register hooks after the sites' own, so they see what the sites produced."""
    seen: dict[str, Any] = {}

    def pre(mod: nn.Module, args: tuple) -> None:
        seen["input"] = args[0]

    def post(mod: nn.Module, args: tuple, out: Any) -> None:
        seen["output"] = out[0]

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)
    return seen


def _assert_mask_shared_over_time(y: Tensor, batch_first: bool) -> None:
    zeros = (y == 0) if batch_first else (y == 0).transpose(0, 1)  # (B, T, F)
    assert zeros.any() and not zeros.all()
    assert bool((zeros == zeros[:, :1]).all()), "mask must be constant along the time axis"
    assert not bool((zeros == zeros[:1]).all()), "mask must differ between sequences"


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_variational_follows_the_rnn_layout(cell: type[nn.RNNBase], batch_first: bool) -> None:
    torch.manual_seed(0)
    model = RNNNet(cell, 1, batch_first)
    plan = inject(model, Rule(match=cell, variant="variational", p=0.5, where="both"))
    assert [s.key for s in plan] == ["rnn:input", "rnn:output"]
    assert all(s.params == {"batch_first": batch_first} for s in plan)
    assert model.rnn.ld_output.batch_first is batch_first
    seen = _capture(model.rnn)
    x = torch.ones((8, 6, 4) if batch_first else (6, 8, 4))
    model.train()
    model(x)
    _assert_mask_shared_over_time(seen["input"], batch_first)
    _assert_mask_shared_over_time(seen["output"], batch_first)


def _packed() -> tuple[PackedSequence, list[int]]:
    lengths = [6, 4, 3, 2]
    return pack_padded_sequence(torch.ones(6, 4, 5), lengths), lengths


def _assert_packed_mask_per_sequence(packed: PackedSequence, lengths: list[int]) -> None:
    padded, _ = pad_packed_sequence(packed)  # (T, B, F)
    zeros = padded == 0
    assert zeros[: lengths[-1]].any()
    for b, n in enumerate(lengths):
        assert bool((zeros[:n, b] == zeros[:1, b]).all())


@pytest.mark.parametrize("where", ["input", "output"])
def test_variational_on_packed_sequences(where: str) -> None:
    torch.manual_seed(0)
    root = nn.Module()
    root.lstm = nn.LSTM(5, 16)
    plain = copy.deepcopy(root)
    plan = inject(
        root, Rule(name="lstm", variant="variational", p=0.5, where=where, exclude_output_layer=False)
    )
    assert [s.key for s in plan] == [f"lstm:{where}"]
    seen = _capture(root.lstm)
    packed, lengths = _packed()
    root.train()
    out, (h, _) = root.lstm(packed)
    assert isinstance(out, PackedSequence) and h.shape == (1, 4, 16)
    _assert_packed_mask_per_sequence(seen[where], lengths)
    root.eval()
    torch.testing.assert_close(root.lstm(packed)[0].data, plain.lstm(packed)[0].data)


def _weight_lstm() -> tuple[nn.Module, nn.LSTM]:
    torch.manual_seed(0)
    root = nn.Module()
    root.lstm = nn.LSTM(4, 8)
    plain = copy.deepcopy(root.lstm)
    plan = inject(
        root,
        Rule(
            name="lstm",
            variant="weight",
            p=0.5,
            params={"weights": ["weight_hh_l0"]},
            exclude_output_layer=False,
        ),
    )
    assert [s.key for s in plan] == ["lstm:weight"]
    assert isinstance(root.lstm.ld_weight, WeightDropout)
    return root, plain


def _flat_weights_are_parameters(lstm: nn.RNNBase) -> bool:
    return all(
        w is lstm._parameters[n] for w, n in zip(lstm._flat_weights, lstm._flat_weights_names, strict=True)
    )


def test_weight_dropout_on_lstm_hidden_weights() -> None:
    root, plain = _weight_lstm()
    lstm = root.lstm
    weight = lstm.weight_hh_l0
    assert list(root.state_dict()) == [f"lstm.{k}" for k in plain.state_dict()]
    assert "lstm.weight_hh_l0" in root.state_dict()
    x = torch.randn(5, 3, 4)
    lstm.eval()
    torch.testing.assert_close(lstm(x)[0], plain(x)[0])
    lstm.train()
    first, second = lstm(x)[0], lstm(x)[0]
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, plain(x)[0])
    assert lstm.weight_hh_l0 is weight and isinstance(weight, nn.Parameter)
    assert _flat_weights_are_parameters(lstm)
    (first.sum() + second.sum()).backward()
    assert weight.grad is not None and bool(weight.grad.abs().sum() > 0)
    assert lstm.weight_ih_l0.grad is not None


def test_weight_dropout_on_lstm_recovers_after_an_exception_in_forward() -> None:
    root, plain = _weight_lstm()
    lstm = root.lstm
    weight = lstm.weight_hh_l0
    lstm.train()
    with pytest.raises(RuntimeError):
        lstm(torch.randn(5, 3, 7))  # wrong input size: raises inside forward, after the pre-hook
    out = lstm(torch.randn(5, 3, 4))[0]
    assert out.shape == (5, 3, 8)
    assert _flat_weights_are_parameters(lstm)
    assert lstm.weight_hh_l0 is weight
    lstm.eval()
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(lstm(x)[0], plain(x)[0])


def test_weight_dropout_on_lstm_defaults_to_hidden_weights_of_every_layer() -> None:
    root = nn.Module()
    root.lstm = nn.LSTM(4, 8, num_layers=2)
    plan = inject(root, Rule(name="lstm", variant="weight", p=0.2, exclude_output_layer=False))
    assert plan["lstm:weight"].params == {"weights": ["weight_hh_l0", "weight_hh_l1"]}


def test_weight_dropout_on_linear() -> None:
    torch.manual_seed(0)
    model = MLP()
    plain = copy.deepcopy(model)
    plan = inject(model, Rule(name="fc2", variant="weight", p=0.5))
    assert plan["fc2:weight"].params == {"weights": ["weight"]}
    assert list(model.state_dict()) == list(plain.state_dict())
    assert "fc2.weight" in model.state_dict()
    weight = model.fc2.weight
    x = torch.randn(4, 6)
    model.eval()
    torch.testing.assert_close(model(x), plain(x))
    model.train()
    first = model(x)
    assert not torch.allclose(first, plain(x))
    assert not torch.allclose(first, model(x))
    assert isinstance(model.fc2.weight, nn.Parameter) and model.fc2.weight is weight
    assert model.fc2._parameters["weight"] is weight
    first.pow(2).sum().backward()
    assert weight.grad is not None and bool(weight.grad.abs().sum() > 0)
    torch.testing.assert_close(model.state_dict()["fc2.weight"], plain.state_dict()["fc2.weight"])


def test_weight_dropout_on_linear_restores_the_parameter_after_an_exception() -> None:
    torch.manual_seed(0)
    model = MLP()
    plain = copy.deepcopy(model)
    inject(model, Rule(name="fc1", variant="weight", p=0.5))
    model.train()
    with pytest.raises(RuntimeError):
        model.fc1(torch.randn(4, 5))  # wrong input size
    assert isinstance(model.fc1.weight, nn.Parameter)
    torch.testing.assert_close(model.state_dict()["fc1.weight"], plain.state_dict()["fc1.weight"])


# ----------------------------------------------------------------------------------------------------------
# 4. replace rules
# ----------------------------------------------------------------------------------------------------------
class WithDropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.drop2d = nn.Dropout2d(0.2)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.alpha = nn.AlphaDropout(0.1)
        self.fc2 = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.25)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop2d(torch.relu(self.conv(x))).flatten(1)
        x = self.alpha(torch.selu(self.fc1(x)))
        return self.out(self.drop(torch.relu(self.fc2(x))))


class AttnAndRNN(nn.Module):
    def __init__(self, mha_dropout: float = 0.0) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dropout=mha_dropout, batch_first=True)
        self.lstm = nn.LSTM(8, 8, num_layers=2, batch_first=True)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        x, _ = self.mha(x, x, x)
        x, _ = self.lstm(x)
        return self.head(self.drop(x))


def test_replace_named_dropout_class_keeps_its_rate() -> None:
    torch.manual_seed(0)
    model = WithDropouts()
    keys = list(model.state_dict())
    original = model.drop
    plan = inject(model, Rule(replace=nn.Dropout, variant="gaussian"))
    assert [s.key for s in plan] == ["drop:replace"]
    assert (plan["drop:replace"].variant, plan["drop:replace"].p) == ("gaussian", 0.25)
    assert isinstance(model.drop, GaussianDropout) and model.drop.p == 0.25
    assert isinstance(model.drop2d, nn.Dropout2d) and isinstance(model.alpha, nn.AlphaDropout)
    assert list(model.state_dict()) == keys
    x = torch.randn(3, 1, 6, 6)
    model.train()
    assert model(x).shape == (3, 2)
    rows = describe(model)
    assert [(r.module_type, r.variant, r.p) for r in rows] == [("Dropout", "gaussian", 0.25)]
    undo(model)
    assert model.drop is original


def test_replace_true_finds_every_dropout_module() -> None:
    model = WithDropouts()
    plan = resolve(model, [Rule(replace=True, variant="gaussian")])
    assert {s.key: s.p for s in plan} == {"drop2d:replace": 0.2, "alpha:replace": 0.1, "drop:replace": 0.25}
    plan = resolve(model, [Rule(replace=True, variant="gaussian", p=0.05)])
    assert {s.p for s in plan} == {0.05}


def test_replace_true_sets_float_dropout_of_attention_and_stacked_rnn() -> None:
    model = AttnAndRNN(mha_dropout=0.1)
    plan = inject(model, Rule(replace=True))
    assert {s.key: (s.where, s.variant, s.p) for s in plan} == {
        "mha:attribute": ("attribute", "attention", 0.1),  # p=None keeps the existing rates
        "lstm:attribute": ("attribute", "standard", 0.0),
        "drop:replace": ("replace", "standard", 0.2),
    }
    undo(model)
    plan = inject(model, Rule(replace=True, p=0.3))
    assert model.mha.dropout == 0.3 and model.lstm.dropout == 0.3
    assert [s.key for s in plan if s.where == "attribute"] == ["mha:attribute", "lstm:attribute"]
    handles = {h.site.key: h for h in site_handles(model)}
    assert handles["mha:attribute"].module is None and handles["mha:attribute"].rate == 0.3
    undo(model)
    assert model.mha.dropout == 0.1 and model.lstm.dropout == 0.0
    assert isinstance(model.drop, nn.Dropout) and not isinstance(model.drop, DropoutVariant)


def test_replace_true_skips_float_sites_the_variant_cannot_take() -> None:
    model = AttnAndRNN()
    plan = resolve(model, [Rule(replace=True, variant="gaussian", p=0.1)])
    assert [s.key for s in plan] == ["drop:replace"]


def test_replace_naming_a_float_dropout_class_with_another_variant_raises() -> None:
    model = AttnAndRNN()
    with pytest.raises(
        DropoutConfigError,
        match=r"float `dropout` of MultiheadAttention 'mha'.*'attention'.*"
        r"'gaussian'",
    ):
        resolve(model, [Rule(replace=nn.MultiheadAttention, variant="gaussian", p=0.1)])
    with pytest.raises(DropoutConfigError, match="float `dropout` of LSTM 'lstm'"):
        resolve(model, [Rule(replace=nn.LSTM, variant="variational", p=0.1)])
    plan = resolve(model, [Rule(replace=nn.MultiheadAttention, variant="attention", p=0.1)])
    assert [s.key for s in plan] == ["mha:attribute"]


class TimmDropPath(nn.Module):
    """Like timm.layers.DropPath: a float ``drop_prob``, no torch dropout base class."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return x


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop_path = nn.Identity()
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop_path(self.fc(x)))


class TimmLike(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


def test_identity_placeholders_replaced_by_name_and_restored() -> None:
    torch.manual_seed(0)
    model = TimmLike()
    plain = copy.deepcopy(model)
    originals = [b.drop_path for b in model.blocks]
    norms = [b.norm for b in model.blocks]
    plan = inject(model, Rule(replace=nn.Identity, name="blocks.*.drop_path", variant="droppath", p=0.1))
    assert [s.key for s in plan] == [f"blocks.{i}.drop_path:replace" for i in range(3)]
    assert all(type(b.drop_path).__name__ == "DropPath" and b.drop_path.p == 0.1 for b in model.blocks)
    assert all(b.norm is n for b, n in zip(model.blocks, norms, strict=True))
    x = torch.randn(16, 8)
    model.eval()
    torch.testing.assert_close(model(x), plain(x))
    model.train()
    assert not torch.allclose(model(x), plain(x))
    assert [r.module_type for r in describe(model)] == ["Identity"] * 3
    undo(model)
    assert all(b.drop_path is o for b, o in zip(model.blocks, originals, strict=True))
    assert repr(model) == repr(plain)


def test_is_dropout_module_detects_torch_ours_and_timm_like_modules() -> None:
    assert is_dropout_module(TimmDropPath(0.1))
    assert not is_dropout_module(nn.Module())
    assert is_dropout_module(nn.Dropout(0.1)) and is_dropout_module(nn.Dropout2d(0.1))
    assert is_dropout_module(nn.AlphaDropout(0.1)) and is_dropout_module(GaussianDropout(0.1))
    assert not is_dropout_module(nn.Identity()) and not is_dropout_module(nn.Linear(2, 2))
    assert not is_dropout_module(nn.MultiheadAttention(4, 1, dropout=0.1))
    model = nn.Sequential(nn.Linear(4, 4), TimmDropPath(0.2), nn.Linear(4, 2))
    plan = resolve(model, [Rule(replace=True, variant="droppath")])
    assert [(s.key, s.p) for s in plan] == [("1:replace", 0.2)]
    # injecting rules never put a site on an existing dropout module
    assert [s.key for s in resolve(model, [Rule(match=nn.Module, p=0.1)])] == ["0:output"]


# ----------------------------------------------------------------------------------------------------------
# 5. attention, overriding, depth scaling, selection
# ----------------------------------------------------------------------------------------------------------
def test_attention_variant_on_transformer_layer_sets_self_attn_dropout() -> None:
    torch.manual_seed(0)
    root = nn.Module()
    root.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    plan = inject(root, Rule(match=nn.TransformerEncoderLayer, variant="attention", p=0.4))
    assert [(s.key, s.variant, s.p) for s in plan] == [("layer.self_attn:attribute", "attention", 0.4)]
    assert root.layer.self_attn.dropout == 0.4
    assert root.layer.dropout.p == 0.0  # the layer's own dropout modules are untouched
    x = torch.randn(2, 6, 8)
    root.layer.train()
    train = root.layer(x)
    root.layer.eval()
    assert not torch.allclose(train, root.layer(x))
    undo(root)
    assert root.layer.self_attn.dropout == 0.0


def test_attention_variant_on_multihead_attention_directly() -> None:
    model = AttnAndRNN()
    plan = inject(model, Rule(match=nn.MultiheadAttention, variant="attention", p=0.2))
    assert [s.key for s in plan] == ["mha:attribute"]
    assert model.mha.dropout == 0.2


def test_later_rules_override_earlier_ones_on_the_same_site() -> None:
    model = MLP()
    plan = inject(model, [Rule(match=nn.Linear, p=0.1), Rule(name="fc1", variant="gaussian", p=0.4)])
    assert {s.key: (s.variant, s.p) for s in plan} == {
        "fc1:output": ("gaussian", 0.4),
        "fc2:output": ("standard", 0.1),
    }
    assert isinstance(model.fc1.ld_output, GaussianDropout) and model.fc1.ld_output.p == 0.4
    assert model.fc2.ld_output.p == 0.1


def test_reapplying_a_site_with_new_settings_replaces_it() -> None:
    model = MLP()
    inject(model, Rule(match=nn.Linear, p=0.1))
    hooks = hook_count(model)
    plan = inject(model, Rule(name="fc1", variant="gaussian", p=0.3))
    assert {s.key: (s.variant, s.p) for s in plan} == {
        "fc1:output": ("gaussian", 0.3),
        "fc2:output": ("standard", 0.1),
    }
    assert isinstance(model.fc1.ld_output, GaussianDropout)
    assert hook_count(model) == hooks
    undo(model)
    assert repr(model) == repr(MLP())


def test_depth_scaling_linear() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)], nn.Linear(4, 2))
    plan = resolve(model, [Rule(match=nn.Linear, p=0.4, depth_scaling="linear")])
    assert [s.target for s in plan] == ["0", "1", "2", "3", "4"]
    assert [s.p for s in plan] == pytest.approx(torch.linspace(0, 0.4, 5).tolist())
    flat = resolve(model, [Rule(match=nn.Linear, p=0.4)])
    assert {s.p for s in flat} == {0.4}
    timm = TimmLike(depth=3)
    plan = resolve(
        timm,
        [
            Rule(
                replace=nn.Identity,
                name="blocks.*.drop_path",
                variant="droppath",
                p=0.2,
                depth_scaling="linear",
            )
        ],
    )
    assert [s.p for s in plan] == pytest.approx([0.0, 0.1, 0.2])


def test_name_glob_regex_and_exclude_select_modules() -> None:
    model = TransformerNet()
    glob = resolve(model, [Rule(name="encoder.layers.*.linear1", p=0.1)])
    assert [s.target for s in glob] == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    regex = resolve(model, [Rule(regex=r"encoder\.layers\.1\.linear[12]", p=0.1)])
    assert [s.target for s in regex] == ["encoder.layers.1.linear1", "encoder.layers.1.linear2"]
    both = resolve(model, [Rule(match=nn.Linear, name="encoder.*", exclude="*.linear2", p=0.1)])
    assert [s.target for s in both] == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    # the regex must match the whole name
    with pytest.raises(DropoutConfigError, match="matches none"):
        resolve(model, [Rule(regex="linear1", p=0.1)])
    mlp = MLP()
    assert [s.target for s in resolve(mlp, [Rule(match=nn.Linear, exclude=["fc1"], p=0.1)])] == ["fc2"]
    # inside nn.MultiheadAttention nothing is selected (its forward calls no submodule)
    assert not any("self_attn" in s.target for s in resolve(model, [Rule(match=nn.Linear, p=0.1)]))


# ----------------------------------------------------------------------------------------------------------
# 6. the BatchNorm warning
# ----------------------------------------------------------------------------------------------------------
class BNFirstDefined(nn.Module):
    """BatchNorm is defined before the conv it follows at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("with_example", [False, True], ids=["definition_order", "execution_order"])
def test_dropout_right_before_batchnorm_warns(with_example: bool) -> None:
    model = CNN2d()
    example = torch.randn(2, 1, 8, 8) if with_example else None
    with pytest.warns(UserWarning, match=r"dropout site 'conv1:output' feeds the BatchNorm 'bn1'"):
        inject(model, Rule(name="conv1", variant="spatial", p=0.2), example_input=example)
    undo(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(
            model,
            [Rule(name="act1", variant="spatial", p=0.2), Rule(name="conv2", variant="spatial", p=0.2)],
            example_input=example,
        )
    undo(model)
    with pytest.warns(UserWarning, match=r"'bn1:input' feeds the BatchNorm 'bn1'"):
        inject(model, Rule(name="bn1", variant="spatial", p=0.2, where="input"), example_input=example)


def test_batchnorm_warning_follows_execution_order_with_example_input() -> None:
    model = BNFirstDefined()
    x = torch.randn(2, 1, 6, 6)
    with pytest.warns(UserWarning, match=r"'conv:output' feeds the BatchNorm 'bn'"):
        inject(model, Rule(name="conv", variant="spatial", p=0.2), example_input=x)


# ----------------------------------------------------------------------------------------------------------
# 7. bad input: one test per entry point, checking the message
# ----------------------------------------------------------------------------------------------------------
class Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(4, 8)
        self.seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.linear2 = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.seq(self.linear1(x)))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_rule_and_site_reject_rates_outside_unit_interval(p: float) -> None:
    with pytest.raises(DropoutConfigError, match=r"`p` must satisfy 0 <= p < 1, but got p="):
        Rule(match=nn.Linear, p=p)
    with pytest.raises(DropoutConfigError, match=r"`p` must satisfy 0 <= p < 1, but got p="):
        Site("linear1", "output", "standard", p)


def test_rule_rejects_non_numeric_rate() -> None:
    with pytest.raises(DropoutConfigError, match="must be a number"):
        Rule(match=nn.Linear, p="0.1")
    with pytest.raises(DropoutConfigError, match="must be a number"):
        Rule(match=nn.Linear, p=True)


def test_injecting_rule_needs_selection_and_rate() -> None:
    with pytest.raises(DropoutConfigError, match="must select modules with `match`, `name` or `regex`"):
        Rule(p=0.1)
    with pytest.raises(DropoutConfigError, match="needs a rate `p`"):
        Rule(match=nn.Linear)
    with pytest.raises(DropoutConfigError, match=r"`where` must be one of \['output', 'input', 'both'\]"):
        Rule(match=nn.Linear, p=0.1, where="after")
    with pytest.raises(DropoutConfigError, match="`depth_scaling` must be one of"):
        Rule(match=nn.Linear, p=0.1, depth_scaling="quadratic")
    with pytest.raises(DropoutConfigError, match="`regex` must be a valid regular expression"):
        Rule(regex="(", p=0.1)
    with pytest.raises(DropoutConfigError, match=r"nearest in torch.nn: \['Linear'"):
        Rule(match="Linaer", p=0.1)
    with pytest.raises(
        DropoutConfigError,
        match=r"takes the parameters \['block_size', 'share_channels'\], "
        r"but got unknown \['size'\]",
    ):
        Rule(match=nn.Conv2d, variant="dropblock", p=0.1, params={"size": 3})


def test_unknown_variant_suggests_the_closest_name() -> None:
    with pytest.raises(DropoutConfigError, match=r"but got variant='gausian'\. Did you mean 'gaussian'\?"):
        Rule(match=nn.Linear, variant="gausian", p=0.1)
    with pytest.raises(DropoutConfigError, match=r"Did you mean 'spatial'\?"):
        Site("linear1", "output", "spatail", 0.1)


def test_rule_matching_nothing_names_the_closest_modules() -> None:
    model = Lin()
    with pytest.raises(
        DropoutConfigError,
        match=r"rules\[1\] Rule\(name=\['lin1'\].*matches none; "
        r"closest module names: \['linear1'",
    ) as info:
        resolve(model, [Rule(match=nn.Linear, p=0.1), Rule(name="lin1", p=0.1)])
    assert "Linear" in str(info.value)  # the module types present
    with pytest.raises(DropoutConfigError, match=r"Rule\(match=\['Conv2d'\].*matches none"):
        inject(model, Rule(match=nn.Conv2d, p=0.1))
    assert applied_plan(model) == DropoutPlan()


def test_spatial_on_2d_output_with_example_input_names_site_and_shape() -> None:
    model = MLP()
    before = repr(model)
    with pytest.raises(
        DropoutConfigError,
        match=r"site 'fc1:output': variant 'spatial' needs a feature map.*"
        r"sees shape \(4, 16\)",
    ):
        inject(model, Rule(name="fc1", variant="spatial", p=0.2), example_input=torch.randn(4, 6))
    assert repr(model) == before and applied_plan(model) == DropoutPlan()


def test_runtime_shape_failure_without_example_input_names_the_site() -> None:
    model = MLP()
    inject(model, Rule(name="fc1", variant="spatial", p=0.2))
    x = torch.randn(4, 6)
    model.eval()
    assert model(x).shape == (4, 3)  # eval is the identity
    model.train()
    with pytest.raises(
        DropoutConfigError,
        match=r"dropout site 'fc1:output': variant 'spatial' needs a feature "
        r"map.*but got shape \(4, 16\)",
    ):
        model(x)


def test_attention_variant_on_a_linear_raises() -> None:
    model = Lin()
    with pytest.raises(
        DropoutConfigError,
        match=r"variant 'attention' applies to nn.MultiheadAttention.*"
        r"selected 'linear1' \(Linear\)",
    ):
        resolve(model, [Rule(name="linear1", variant="attention", p=0.1)])
    with pytest.raises(
        DropoutConfigError,
        match=r"site 'linear1:output': variant 'attention' is applied with "
        r"where='attribute'",
    ):
        apply_plan(model, DropoutPlan([Site("linear1", "output", "attention", 0.1)]))
    with pytest.raises(
        DropoutConfigError,
        match=r"site 'linear1:attribute': where='attribute' needs "
        r"nn.MultiheadAttention.*target is Linear",
    ):
        apply_plan(model, DropoutPlan([Site("linear1", "attribute", "attention", 0.1)]))
    rnn = RNNNet(nn.LSTM, 1, True)
    with pytest.raises(
        DropoutConfigError, match=r"site 'rnn:attribute': where='attribute' needs .*num_layers > 1"
    ):
        apply_plan(rnn, DropoutPlan([Site("rnn", "attribute", "standard", 0.1)]))
    with pytest.raises(
        DropoutConfigError,
        match=r"float dropout of LSTM takes only variant 'standard', but got "
        r"'attention'",
    ):
        apply_plan(RNNNet(nn.LSTM, 2, True), DropoutPlan([Site("rnn", "attribute", "attention", 0.1)]))


def test_weight_variant_on_module_without_those_weights_raises() -> None:
    model = Lin()
    with pytest.raises(
        DropoutConfigError,
        match=r"variant 'weight' needs parameters \['weight'\] on ReLU, which "
        r"has \[\]",
    ):
        resolve(model, [Rule(name="seq.1", variant="weight", p=0.1)])
    with pytest.raises(
        DropoutConfigError,
        match=r"needs parameters \['weight_hh_l0'\] on Linear, which has "
        r"\['weight', 'bias'\]",
    ):
        inject(model, Rule(name="linear1", variant="weight", p=0.1, params={"weights": ["weight_hh_l0"]}))
    with pytest.raises(DropoutConfigError, match=r"needs parameters \['weight_hh_l0'\] on Linear"):
        apply_plan(
            model, DropoutPlan([Site("linear1", "weight", "weight", 0.1, {"weights": ["weight_hh_l0"]})])
        )
    with pytest.raises(DropoutConfigError, match=r"where='weight' takes only variant 'weight'"):
        apply_plan(model, DropoutPlan([Site("linear1", "weight", "standard", 0.1)]))
    assert applied_plan(model) == DropoutPlan()


def test_input_placement_on_sequential_raises() -> None:
    model = Lin()
    with pytest.raises(DropoutConfigError, match=r"where='input' is not supported on nn.Sequential 'seq'"):
        resolve(model, [Rule(name="seq", p=0.1, where="input")])
    with pytest.raises(
        DropoutConfigError,
        match=r"site 'seq:input': where='input' is not supported on "
        r"nn.Sequential",
    ):
        apply_plan(model, DropoutPlan([Site("seq", "input", "standard", 0.1)]))


def test_inject_needs_exactly_one_of_rules_and_plan() -> None:
    model = Lin()
    with pytest.raises(
        DropoutConfigError, match=r"give exactly one of `rules` and `plan`.*rules=set, plan=set"
    ):
        inject(model, Rule(match=nn.Linear, p=0.1), plan=DropoutPlan())
    with pytest.raises(
        DropoutConfigError, match=r"give exactly one of `rules` and `plan`.*rules=None, plan=None"
    ):
        inject(model)


def test_apply_plan_needs_a_plan() -> None:
    model = Lin()
    site = Site("linear1", "output", "standard", 0.1)
    with pytest.raises(DropoutConfigError, match=r"`plan` must be a DropoutPlan, but got list"):
        apply_plan(model, [site])  # type: ignore[arg-type]
    with pytest.raises(DropoutConfigError, match=r"`plan` must be a DropoutPlan, but got dict"):
        apply_plan(model, DropoutPlan([site]).to_dict())  # type: ignore[arg-type]


def test_plan_site_on_a_missing_module_names_the_nearest_and_changes_nothing() -> None:
    model = Lin()
    before = repr(model)
    plan = DropoutPlan(
        [Site("linear1", "output", "standard", 0.1), Site("linear3", "output", "standard", 0.1)]
    )
    with pytest.raises(
        DropoutConfigError,
        match=r"site 'linear3:output' targets a module that must exist in Lin, "
        r"but there is no 'linear3'; nearest: \[.*'linear1'",
    ):
        apply_plan(model, plan)
    assert repr(model) == before and applied_plan(model) == DropoutPlan() and hook_count(model) == 0


def test_existing_ld_child_is_not_overwritten() -> None:
    model = Lin()
    model.linear1.ld_output = nn.Identity()  # the name is taken by the user
    with pytest.raises(DropoutConfigError, match=r"'linear1' already has a child 'ld_output'"):
        inject(model, Rule(name="linear1", p=0.1))


# ----------------------------------------------------------------------------------------------------------
# 8. learned rates: regularization
# ----------------------------------------------------------------------------------------------------------
def test_regularization_is_zero_without_concrete_sites() -> None:
    model = MLP()
    assert float(regularization(model)) == 0.0
    inject(model, Rule(match=nn.Linear, p=0.2))
    reg = regularization(model)
    assert isinstance(reg, Tensor) and reg.shape == () and float(reg) == 0.0


def test_regularization_with_concrete_sites_is_differentiable() -> None:
    torch.manual_seed(0)
    model = MLP()
    keys = list(model.state_dict())
    plan = inject(model, Rule(match=nn.Linear, variant="concrete", p=0.2))
    assert [s.key for s in plan] == ["fc1:output", "fc2:output"]
    assert list(model.state_dict()) == [
        *keys[:2],
        "fc1.ld_output.p_logit",
        *keys[2:4],
        "fc2.ld_output.p_logit",
        *keys[4:],
    ]
    assert set(model.state_dict()) - set(keys) == {"fc1.ld_output.p_logit", "fc2.ld_output.p_logit"}
    assert isinstance(model.fc1.ld_output, ConcreteDropout)
    model.train()
    model(torch.randn(8, 6))
    reg = regularization(model)
    assert reg.requires_grad and reg.shape == ()
    expected = model.fc1.ld_output.regularizer(
        [model.fc1.weight, model.fc1.bias]
    ) + model.fc2.ld_output.regularizer([model.fc2.weight, model.fc2.bias])
    torch.testing.assert_close(reg, expected)
    reg.backward()
    for layer in (model.fc1, model.fc2):
        assert layer.ld_output.p_logit.grad is not None and float(layer.ld_output.p_logit.grad.abs()) > 0
        assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)
    assert model.out.weight.grad is None
    plain = MLP()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "p_logit" not in k}, strict=True)
    undo(model)
    assert list(model.state_dict()) == keys


# ----------------------------------------------------------------------------------------------------------
# 9. determinism across processes
# ----------------------------------------------------------------------------------------------------------
_SCRIPT = """
import torch
from torch import nn
from lightning_dropout import Rule, resolve

torch.manual_seed({seed})
model = nn.Sequential(
    nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.Dropout(0.1), nn.Flatten(),
    nn.Linear(32, 8), nn.LSTM(8, 8, num_layers=2), nn.Linear(8, 2),
)
rules = [
    Rule(match=nn.Conv1d, variant="dropblock", p=0.2, params={{"block_size": 2}}),
    Rule(match=nn.Linear, p=0.3, depth_scaling="linear"),
    Rule(name=["5", "6"], variant="gaussian", p=0.1),
    Rule(replace=True, p=0.25),
    Rule(match="LSTM", variant="weight", p=0.4),
]
plan = resolve(model, rules)
print(plan.digest())
print(plan.to_yaml(), end="")
"""


@pytest.mark.slow
def test_resolve_is_deterministic_across_processes() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_SCRIPT.format(seed=0), "<plan>", "exec"), namespace)
    plan: DropoutPlan = namespace["plan"]
    expected = f"{plan.digest()}\n{plan.to_yaml()}"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(seed=7)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert DropoutPlan.from_yaml(result.stdout.split("\n", 1)[1]) == plan
    assert len(plan) == 7


# ----------------------------------------------------------------------------------------------------------
# Regressions: bugs found while writing these tests, fixed in inject.py
# ----------------------------------------------------------------------------------------------------------
def test_undo_keeps_the_names_of_a_named_sequential() -> None:
    root = nn.Module()
    root.net = nn.Sequential(OrderedDict(fc1=nn.Linear(3, 4), act=nn.ReLU(), out=nn.Linear(4, 2)))
    keys = list(root.state_dict())
    before = repr(root)
    inject(root, Rule(name="net", p=0.2))
    assert list(root.state_dict()) == keys
    undo(root)
    assert list(root.state_dict()) == keys
    assert repr(root) == before


def test_describe_reports_the_shape_of_replace_sites() -> None:
    model = WithDropouts()
    inject(model, Rule(replace=nn.Dropout, variant="gaussian"))
    rows = describe(model, torch.randn(3, 1, 6, 6))
    assert [(r.key, r.shape) for r in rows] == [("drop:replace", (3, 8))]


def test_resolving_a_replace_rule_again_after_injection() -> None:
    model = WithDropouts()
    rule = Rule(replace=nn.Dropout, variant="gaussian")
    plan = inject(model, rule)
    assert resolve(model, [rule]) == plan
    assert inject(model, rule) == plan
