"""Inspecting applied sites (``lightning_dropout.handles``): regularization, describe."""

from __future__ import annotations

import pytest
import torch
from inject_models import MLP, WithDropouts
from torch import Tensor, nn

from lightning_dropout import (
    Rule,
    describe,
    inject,
    undo,
)
from lightning_dropout.injection import regularization, resolve
from lightning_dropout.variants import ConcreteDropout

pytestmark = pytest.mark.usefixtures("one_thread")


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
# Regressions: bugs found while writing these tests, fixed in the injection engine
# ----------------------------------------------------------------------------------------------------------
def test_describe_reports_the_shape_of_replace_sites() -> None:
    model = WithDropouts()
    inject(model, Rule(replace=nn.Dropout, variant="gaussian"))
    rows = describe(model, torch.randn(3, 1, 6, 6))
    assert [(r.key, r.shape) for r in rows] == [("drop:replace", (3, 8))]


# ----------------------------------------------------------------------------------------------------------
# The dropout a model already has: existing_dropout, and describe on a model nothing was injected into
# ----------------------------------------------------------------------------------------------------------
def test_existing_dropout_lists_a_zoo_models_own_dropout() -> None:
    from lightning_dropout import existing_dropout, format_sites
    from lightning_dropout.zoo import MLP as ZooMLP
    from lightning_dropout.zoo import TransformerEncoderClassifier

    model = TransformerEncoderClassifier()
    example = model.example_input_array
    rows = existing_dropout(model, example)
    by_key = {r.key: r for r in rows}
    for layer in (0, 1):
        assert by_key[f"encoder.layers.{layer}.self_attn:attribute"].kind == "rate attribute"
        assert by_key[f"encoder.layers.{layer}.self_attn:attribute"].module_type == "MultiheadAttention"
        for name in ("dropout", "dropout1", "dropout2"):
            row = by_key[f"encoder.layers.{layer}.{name}:replace"]
            assert (row.module_type, row.kind, row.p, row.variant) == ("Dropout", "module", 0.0, "")
    assert len(rows) == 8 and by_key["encoder.layers.0.dropout1:replace"].shape is not None
    assert [r.key for r in rows] == [
        s.key for s in resolve(model, [Rule(replace=True)])
    ]  # what replace finds
    # describe on the un-injected model shows the same, as a table with a kind column
    assert describe(model, example) == rows
    table = format_sites(describe(model))
    assert table.splitlines()[0].split() == ["site", "module", "kind", "p", "shape"]
    assert "encoder.layers.1.dropout2:replace" in table and "rate attribute" in table
    # once injected, describe shows the applied sites; existing_dropout still the model's own, at its own rates
    inject(model, [Rule(replace=True, p=0.3)])
    assert {r.variant for r in describe(model)} == {"standard", "attention"}
    assert {r.p for r in describe(model)} == {0.3}
    assert [(r.key, r.p) for r in existing_dropout(model)] == [(r.key, 0.0) for r in rows]
    undo(model)
    assert describe(model) == existing_dropout(model) and describe(model, existing=False) == []
    assert existing_dropout(ZooMLP()) == [] and describe(ZooMLP()) == []


def test_existing_dropout_finds_rate_attributes() -> None:
    from lightning_dropout import existing_dropout

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.hidden_dropout = 0.2
            self.drop = nn.Dropout(0.1)

        def forward(self, x: Tensor) -> Tensor:
            return self.drop(nn.functional.dropout(self.fc(x), p=self.hidden_dropout, training=self.training))

    model = nn.Sequential(Functional(), nn.LSTM(4, 4, num_layers=2, dropout=0.25))
    rows = {r.key: (r.module_type, r.kind, r.p) for r in existing_dropout(model)}
    assert rows == {
        "0.hidden_dropout:attribute": ("Functional", "rate attribute", 0.2),
        "0.drop:replace": ("Dropout", "module", 0.1),
        "1:attribute": ("LSTM", "rate attribute", 0.25),
    }
