"""Rules and rules -> plan (``lightning_dropout.rules``, ``lightning_dropout._resolve``): replace rules, attention,
overriding, depth scaling, selection, bad rules, determinism across processes."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from inject_models import MLP, Lin, TransformerNet, WithDropouts, hook_count
from torch import Tensor, nn

from lightning_dropout import (
    DropoutConfigError,
    DropoutPlan,
    Rule,
    Site,
    applied_plan,
    describe,
    inject,
    resolve,
    site_handles,
    undo,
)
from lightning_dropout.injection import is_dropout_module
from lightning_dropout.variants import DropoutVariant, GaussianDropout

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# 4. replace rules
# ----------------------------------------------------------------------------------------------------------


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
# 7. bad input: rules (the other entry points are in test_inject.py)
# ----------------------------------------------------------------------------------------------------------
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
# Regressions: bugs found while writing these tests, fixed in the injection engine
# ----------------------------------------------------------------------------------------------------------
def test_resolving_a_replace_rule_again_after_injection() -> None:
    model = WithDropouts()
    rule = Rule(replace=nn.Dropout, variant="gaussian")
    plan = inject(model, rule)
    assert resolve(model, [rule]) == plan
    assert inject(model, rule) == plan
