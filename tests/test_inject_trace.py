"""Tracing an example input (``lightning_dropout._trace``): the output layer, found by execution order."""

from __future__ import annotations

import pytest
import torch
from inject_models import MLP
from torch import Tensor, nn

from lightning_dropout import (
    Rule,
    inject,
    output_layer,
    resolve,
)
from lightning_dropout.variants import DropoutVariant

pytestmark = pytest.mark.usefixtures("one_thread")


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
