"""Inspecting applied sites: live handles on their rates, :func:`describe` and its table, and the
regularization of learned-rate sites (torch only)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dropout._resolve import existing_sites
from lightning_dropout._state import CHILD_FOR, STATE_ATTR, float_slot
from lightning_dropout._trace import trace_input
from lightning_dropout.errors import DropoutConfigError, check_instance, check_rate
from lightning_dropout.plan import Site
from lightning_dropout.schedules import Schedule
from lightning_dropout.variants import DropoutVariant

__all__ = [
    "SiteHandle",
    "SiteInfo",
    "bind_schedules",
    "describe",
    "existing_dropout",
    "format_sites",
    "regularization",
    "site_handles",
]


@dataclass
class SiteHandle:
    """A live site: its plan entry, the variant module (``None`` for attribute sites), its owner and, for
    attribute sites, the name of the float it sets on the owner."""

    site: Site
    module: DropoutVariant | None
    owner: nn.Module
    attr: str = "dropout"  # the float an attribute site sets on its owner

    @property
    def rate(self) -> float:
        return float(getattr(self.owner, self.attr)) if self.module is None else float(self.module.p)

    def set_rate(self, p: float) -> None:
        if self.module is None:
            setattr(self.owner, self.attr, check_rate(p))
        else:
            self.module.set_rate(p)


def site_handles(model: nn.Module) -> list[SiteHandle]:
    """Handles on every applied site, in plan order."""
    check_instance(model, nn.Module, "model", "site_handles(model)", "an nn.Module")
    out = []
    for record in model.__dict__.get(STATE_ATTR, {}).values():
        site = record.site
        attr = "dropout"
        if site.where == "attribute":
            owner, attr = float_slot(model, site)
            module = None
        else:
            owner = model.get_submodule(site.target)
            if site.where == "replace":
                module = owner
            elif isinstance(owner, nn.Sequential) and site.where == "output":
                module = owner._modules[record.original]
            else:
                module = owner._modules[CHILD_FOR[site.where]]
        out.append(SiteHandle(site, module, owner, attr))  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class SiteInfo:
    """One row of :func:`describe` or :func:`existing_dropout`.

    For the model's own dropout (:func:`existing_dropout`) ``variant`` is empty and ``kind`` says how the model
    applies it: ``"module"`` (a dropout module it calls), ``"bypassed"`` (a dropout module whose ``.p`` a fused
    kernel reads, or that its owner never calls: only ``standard`` acts there) or ``"rate attribute"`` (a
    float applied with ``nn.functional.dropout`` or inside a kernel: attention, RNN, Hugging Face's
    ``self.dropout``); ``key`` is the site a ``Rule(replace=True)`` would create there."""

    key: str
    target: str
    module_type: str
    where: str
    variant: str
    p: float
    params: dict[str, Any]
    shape: tuple[int, ...] | None
    kind: str = ""


def existing_dropout(model: nn.Module, example_input: Any = None) -> list[SiteInfo]:
    """List the dropout ``model`` has of its own, whether or not anything was injected: dropout modules
    (``nn.Dropout*``, timm and torchvision drop-path/drop-block), the float ``dropout`` of attention and
    stacked RNNs, and float rates modules apply functionally (Hugging Face BART's ``self.dropout``, ...), each
    with the rate the model gave it, the site ``Rule(replace=True)`` would create there and how the model
    applies it (:attr:`SiteInfo.kind`). With ``example_input`` a training-mode probe proves rate attributes and
    finds the dropout modules a fused attention kernel bypasses, and each row gets the shape its site sees;
    without one, the owners' source is read. Nothing of the model changes.
    ``print(format_sites(existing_dropout(model)))`` shows it as a table."""
    check_instance(model, nn.Module, "model", "existing_dropout(model)", "an nn.Module")
    found = existing_sites(model, example_input)
    trace = trace_input(model, example_input) if example_input is not None and found else None
    return [
        SiteInfo(
            site.key,
            site.target,
            type(module).__name__,
            site.where,
            "",
            site.p,
            {},
            trace.in_shapes.get(site.target) if trace is not None else None,
            kind,
        )
        for site, module, kind in found
    ]


def describe(model: nn.Module, example_input: Any = None, *, existing: bool | None = None) -> list[SiteInfo]:
    """List every applied site: name, module type, variant, current rate, and the shape the site sees when
    ``example_input`` is given. ``print(format_sites(describe(model)))`` shows it as a table.

    ``existing=True`` lists the model's own dropout instead (:func:`existing_dropout`); the default ``None``
    does so when no site is applied (a model not injected yet), ``False`` never."""
    check_instance(model, nn.Module, "model", "describe(model)", "an nn.Module")
    if existing or (existing is None and not model.__dict__.get(STATE_ATTR)):
        return existing_dropout(model, example_input)
    trace = trace_input(model, example_input) if example_input is not None else None
    rows = []
    for handle in site_handles(model):
        site = handle.site
        shape = None
        if trace is not None:
            shapes = trace.in_shapes if site.where in ("input", "replace") else trace.out_shapes
            shape = shapes.get(site.target)
        module_type = type(
            handle.owner if site.where != "replace" else model.__dict__[STATE_ATTR][site.key].original
        )
        rows.append(
            SiteInfo(
                site.key,
                site.target,
                module_type.__name__,
                site.where,
                site.variant,
                handle.rate,
                dict(site.params),
                shape,
            )
        )
    return rows


def format_sites(rows: Iterable[SiteInfo]) -> str:
    """A fixed-width text table of :func:`describe` rows (of :func:`existing_dropout` rows: site, module, kind,
    rate and shape)."""
    rows = list(rows)
    body: list[tuple[str, ...]]
    if rows and all(r.kind for r in rows):
        header: tuple[str, ...] = ("site", "module", "kind", "p", "shape")
        body = [
            (r.key, r.module_type, r.kind, f"{r.p:.3g}", "x".join(map(str, r.shape)) if r.shape else "")
            for r in rows
        ]
    else:
        header = ("site", "module", "variant", "p", "params", "shape")
        body = [
            (
                r.key,
                r.module_type,
                r.variant,
                f"{r.p:.3g}",
                ", ".join(f"{k}={v}" for k, v in r.params.items()),
                "x".join(map(str, r.shape)) if r.shape else "",
            )
            for r in rows
        ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    return "\n".join(lines)


def regularization(model: nn.Module) -> Tensor:
    """The sum of the regularizers of every learned-rate (``concrete``) site applied to ``model``; a zero
    tensor when there is none. Each site's weight term uses the parameters of the module it sits on (for
    ``replace`` sites, which own none, only the rate term counts)."""
    total: Tensor | None = None
    for handle in site_handles(model):
        regularizer = getattr(handle.module, "regularizer", None)
        if regularizer is None:
            continue
        own = {id(p) for p in handle.module.parameters()}  # type: ignore[union-attr]
        weights = [p for p in handle.owner.parameters() if id(p) not in own]
        term = regularizer(weights)
        total = term if total is None else total + term
    if total is None:
        first = next(model.parameters(), None)
        return torch.zeros((), device=first.device if first is not None else None)
    return total


def bind_schedules(
    schedule: Schedule | Mapping[str, Schedule] | None, handles: Sequence[SiteHandle]
) -> list[tuple[SiteHandle, Schedule, float]]:
    """Each schedulable site with its schedule and base rate: one schedule for every site, or the first of a
    mapping whose glob matches the site's ``"<target>:<where>"`` key (every glob must match a site). Learned
    (``concrete``) sites are never scheduled."""
    if schedule is None:
        return []
    bound = []
    for handle in handles:
        if handle.module is not None and not handle.module.schedulable:
            continue
        if isinstance(schedule, Schedule):
            chosen: Schedule | None = schedule
        else:
            chosen = next((s for g, s in schedule.items() if fnmatch.fnmatchcase(handle.site.key, g)), None)
        if chosen is not None:
            bound.append((handle, chosen, handle.site.p))
    if isinstance(schedule, Mapping):
        unused = [g for g in schedule if not any(fnmatch.fnmatchcase(h.site.key, g) for h in handles)]
        if unused:
            keys = [h.site.key for h in handles]
            raise DropoutConfigError(
                f"`schedule` globs must match a site, but {unused} match none of {keys}."
            )
    return bound
