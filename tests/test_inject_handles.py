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
from lightning_dropout.inject import regularization
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
