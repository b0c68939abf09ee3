"""The hooks on real torch modules (``lightning_dropout._hooks``): variational dropout on recurrent layouts and
packed sequences, weight dropout."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from inject_models import MLP, RNNNet
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lightning_dropout import (
    Rule,
    inject,
)
from lightning_dropout.variants import WeightDropout

pytestmark = pytest.mark.usefixtures("one_thread")


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
