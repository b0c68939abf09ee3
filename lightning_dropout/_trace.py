"""Tracing an example input through a model: leaf call order and the shapes each module sees, and the output
layer found from them (torch only)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_dropout.rules import is_leaf
from lightning_dropout.variants import DropoutVariant

__all__ = ["Trace", "call_model", "definition_order", "output_layer", "trace_input"]


# ----------------------------------------------------------------------------------------------------------
# Tracing an example input: call order and shapes
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    order: list[str]  # leaf module names in call order
    out_shapes: dict[str, tuple[int, ...]]
    in_shapes: dict[str, tuple[int, ...]]


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, PackedSequence):
        return value.data
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    return None


def call_model(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def trace_input(model: nn.Module, example_input: Any) -> Trace:
    """Run ``example_input`` through ``model`` in eval mode with grad on (torch's Transformer inference fast
    path would skip submodules), recording leaf call order and the shapes each module sees."""
    trace = Trace([], {}, {})
    names: dict[int, str] = {}
    for qualname, mod in model.named_modules():
        names.setdefault(id(mod), qualname)
    handles = []

    def record(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        qualname = names.get(id(mod))
        if qualname is None:
            return
        if is_leaf(mod) and not isinstance(mod, DropoutVariant):
            trace.order.append(qualname)
        inp, res = _first_tensor(args), _first_tensor(out)
        if inp is not None:
            trace.in_shapes.setdefault(qualname, tuple(inp.shape))
        if res is not None:
            trace.out_shapes.setdefault(qualname, tuple(res.shape))

    flags = {mod: mod.training for mod in model.modules()}
    for mod in model.modules():
        handles.append(mod.register_forward_hook(record))
    try:
        model.eval()
        with torch.enable_grad():
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for mod, flag in flags.items():
            mod.training = flag
    return trace


def definition_order(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_leaf(m) and not isinstance(m, DropoutVariant)]


def output_layer(model: nn.Module, example_input: Any = None, *, _traced: Trace | None = None) -> str | None:
    """The qualified name of the model's final output layer: the last leaf module with parameters to run on
    ``example_input`` when given, else the last one defined."""
    if _traced is None and example_input is not None:
        _traced = trace_input(model, example_input)
    order = _traced.order if _traced is not None else definition_order(model)
    for qualname in reversed(order):
        if any(True for _ in model.get_submodule(qualname).parameters(recurse=False)):
            return qualname
    return None
