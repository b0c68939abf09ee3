"""The records of what lightning-dropout applied to a model, and the module each site acts on (torch only).

Every application is recorded on the root module (``_lightning_dropout_records``), so :func:`undo
<lightning_dropout.injection.undo>` restores the original tree exactly, applying the same plan twice changes
nothing, and resolving rules again looks through what was replaced. Rules, apply/undo and the inspection
helpers all read these records; keeping them here means none of those modules imports another for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_dropout.errors import DropoutConfigError, closest
from lightning_dropout.plan import Site

__all__ = [
    "CHILD_FOR",
    "INPUT_CHILD",
    "OUTPUT_CHILD",
    "STATE_ATTR",
    "WEIGHT_CHILD",
    "SiteRecord",
    "float_slot",
    "site_module",
    "site_records",
]

OUTPUT_CHILD = "ld_output"
INPUT_CHILD = "ld_input"
WEIGHT_CHILD = "ld_weight"
CHILD_FOR = {"output": OUTPUT_CHILD, "input": INPUT_CHILD, "weight": WEIGHT_CHILD}
STATE_ATTR = "_lightning_dropout_records"


@dataclass
class SiteRecord:
    site: Site
    original: Any = None  # replaced module; original float (attribute); appended key (Sequential output)


def site_records(model: nn.Module) -> dict[str, SiteRecord]:
    records: dict[str, SiteRecord] = model.__dict__.setdefault(STATE_ATTR, {})
    return records


def site_module(model: nn.Module, target: str, site: Site) -> nn.Module:
    """The module ``site`` acts on; for a rate-attribute site (``"<owner>.<attribute>"``) its owner."""
    try:
        return model.get_submodule(target)
    except AttributeError:
        if site.where == "attribute" and target:
            owner_name, _, attr = target.rpartition(".")
            try:
                owner = model.get_submodule(owner_name)
            except AttributeError:
                owner = None
            if owner is not None and attr in vars(owner):
                return owner
        names = [n for n, _ in model.named_modules()]
        raise DropoutConfigError(
            f"site {site.key!r} targets a module that must exist in {type(model).__name__}, but there is no "
            f"{target!r}; nearest: {closest(target, names)}."
        ) from None


def float_slot(model: nn.Module, site: Site) -> tuple[nn.Module, str]:
    """``(module, attribute)`` holding the float rate of an attribute site: ``dropout`` of the target module
    (nn.MultiheadAttention, stacked RNNs), or the attribute of a ``"<owner>.<attribute>"`` path."""
    try:
        return model.get_submodule(site.target), "dropout"
    except AttributeError:
        return site_module(model, site.target, site), site.target.rpartition(".")[2]
