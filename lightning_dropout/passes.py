"""Extra evaluation passes that leave training untouched (torch and torchmetrics; used by the monitors)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn

from lightning_dropout.variants import DropoutVariant

__all__ = ["metric_modules", "untouched"]


def metric_modules(module: nn.Module) -> list[torchmetrics.Metric]:
    return [m for m in module.modules() if isinstance(m, torchmetrics.Metric)]


@contextmanager
def untouched(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run extra passes without changing training: random number generators (global, CUDA, and each dropout
    site's own) are forked; every torchmetrics state, every module's train/eval flag and the module's public
    list and dict attributes (outputs that ``validation_step`` collects) are restored."""
    generators = [
        m.generator for m in pl_module.modules() if isinstance(m, DropoutVariant) and m.generator is not None
    ]
    states = [(g, g.get_state()) for g in {id(g): g for g in generators}.values()]
    metrics = [
        (m, {k: copy.deepcopy(getattr(m, k)) for k in m._defaults}, m._update_count, m._computed)
        for m in metric_modules(pl_module)
    ]
    flags = {m: m.training for m in pl_module.modules()}
    # what validation_step may append to (Lightning 2's `self.validation_step_outputs.append(...)` pattern)
    containers = [
        (v, copy.copy(v))
        for k, v in vars(pl_module).items()
        if not k.startswith("_") and isinstance(v, (list, dict))
    ]
    device = pl_module.device
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for g, rng_state in states:
            g.set_state(rng_state)
        for metric, metric_state, count, computed in metrics:
            for k, v in metric_state.items():
                setattr(metric, k, v)
            metric._update_count = count
            metric._computed = computed
        for module, flag in flags.items():
            module.training = flag
        for container, saved in containers:  # restored in place: the module may hold other references
            container.clear()
            if isinstance(container, dict):
                container.update(saved)
            else:
                container.extend(saved)
