"""Loading a checkpoint of an injected model: the plan it was trained with, then its weights (the Lightning
layer: reads the state :class:`~lightning_dropout.callback.DropoutInjector` saves under its state key, which
starts with :data:`STATE_KEY_PREFIX`). ``lightning_dropout.callback`` re-exports :func:`load_checkpoint`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.injection import apply_plan
from lightning_dropout.plan import DropoutPlan

__all__ = ["STATE_KEY_PREFIX", "checkpoint_plan", "load_checkpoint"]

STATE_KEY_PREFIX = (
    "DropoutInjector"  # Lightning keys a callback's state by its class name (and its state key)
)


def checkpoint_plan(checkpoint: Mapping[str, Any]) -> DropoutPlan:
    """The dropout plan a Lightning checkpoint dict was trained with (from its DropoutInjector states)."""
    states = checkpoint.get("callbacks") or {}
    found = [s for k, s in states.items() if str(k).startswith(STATE_KEY_PREFIX)]
    if not found:
        raise DropoutConfigError(
            "the checkpoint must hold a DropoutInjector state, but its callbacks are "
            f"{sorted(map(str, states))}; was it trained with DropoutInjector?"
        )
    # several named injectors: their (disjoint) sites together
    return DropoutPlan([site for state in found for site in DropoutPlan.from_dict(state.get("plan"))])


def load_checkpoint(
    model_cls: type[pl.LightningModule], checkpoint_path: str | Path, map_location: Any = "cpu", **kwargs: Any
) -> pl.LightningModule:
    """Load a checkpoint of an injected model for inference, dropout sites included, strictly.

    The one-liner: ``model = load_checkpoint(MyModel, "epoch=9.ckpt")``. The module is built from the
    checkpoint's hyperparameters (``**kwargs`` override them, as in ``load_from_checkpoint``), the plan saved
    by :class:`DropoutInjector` is applied, then every weight, learned rates included, is loaded with
    ``strict=True``.
    """
    if not isinstance(checkpoint_path, (str, os.PathLike)):
        raise DropoutConfigError(
            "`load_checkpoint(model_cls, checkpoint_path)` takes the path of a .ckpt file as `checkpoint_path`, "
            f"but got {type(checkpoint_path).__name__} {checkpoint_path!r:.60}."
        )
    if "://" not in str(checkpoint_path) and not Path(checkpoint_path).is_file():  # remote URLs: fsspec's
        raise DropoutConfigError(
            f"`checkpoint_path` must be an existing checkpoint file, but got {str(checkpoint_path)!r} (no such file)."
        )
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    plan = checkpoint_plan(checkpoint)
    model = model_cls.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=False, **kwargs)
    apply_plan(model, plan)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()
