"""Behaviour of the injection engine end to end (``lightning_dropout.injection``): rules -> plan -> sites on real torch
modules, undo, describe, the BatchNorm warning, errors at each entry point. Rules, tracing, hooks and inspection
have their own tests/test_inject_*.py; the models they share are in tests/inject_models.py."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from inject_models import MLP, CNN2d, Lin, RNNNet, TransformerNet, hook_count
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

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
    resolve,
    site_handles,
    undo,
)
from lightning_dropout.variants import DropoutVariant


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
# Regressions: bugs found while writing these tests, fixed in the injection engine
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
