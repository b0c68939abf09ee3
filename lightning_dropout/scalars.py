"""What a site logs, and how TensorBoard groups it: the ``dropout/...`` scalar tags of each site, the
"Custom Scalars" layout that puts the sites of a group on one chart per quantity, and the chart that overlays
validation, clean training and dropout-on training values per metric (torch only).

A site is named in logged keys ``<target>.<where>`` (``fc1.output``, ``fc1.weight`` for DropConnect), not by its
plan key ``fc1:output``: MLflow refuses ``:`` in a key (Lightning's ``MLFlowLogger`` rewrites it to
``fc1output``, with one warning per key), while ``.`` is accepted by MLflow, W&B and TensorBoard alike.
:func:`site_key` reads either form back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_dropout.handles import SiteHandle
from lightning_dropout.variants import ConcreteDropout

__all__ = [
    "LOG_PREFIX",
    "SITE_SEPARATOR",
    "gap_layout",
    "rate_tag",
    "scalar_layout",
    "site_groups",
    "site_key",
    "site_name",
    "write_layout",
]

LOG_PREFIX = "dropout"
SITE_SEPARATOR = "."  # between a site's target and its `where` in logged keys (MLflow, W&B, TensorBoard)
GAP_CATEGORY = "val vs train"  # the Custom Scalars category of the GapMonitor's overlays
_LAYOUT_ATTR = "_lightning_dropout_layout"  # the layout written so far, kept on the SummaryWriter


def site_name(key: str) -> str:
    """A site's plan key as it is logged: ``"fc1:output"`` -> ``"fc1.output"``.

    >>> site_name("encoder.layers.0.linear1:output")
    'encoder.layers.0.linear1.output'
    """
    target, _, where = key.rpartition(":")
    return f"{target}{SITE_SEPARATOR}{where}" if _ else key


def site_key(name: str) -> str:
    """The plan key of a logged site name, in either form: ``"fc1.output"`` or ``"fc1:output"`` ->
    ``"fc1:output"`` (``where`` is the last part and never holds a dot).

    >>> site_key("fc1.weight"), site_key("fc1:weight")
    ('fc1:weight', 'fc1:weight')
    """
    if ":" in name:
        return name
    target, _, where = name.rpartition(SITE_SEPARATOR)
    return f"{target}:{where}"


def rate_kind(handle: SiteHandle) -> str:
    """``learned`` for concrete sites (the optimizer sets their rate), ``rate`` for the others."""
    return "learned" if isinstance(handle.module, ConcreteDropout) else "rate"


def rate_tag(handle: SiteHandle, quantity: str) -> str:
    """``dropout/rate/<site>``, ``dropout/fraction/<site>``; learned (concrete) rates are ``dropout/learned/<site>``
    (``<site>`` as :func:`site_name` writes it: ``dropout/rate/fc1.output``)."""
    kind = rate_kind(handle) if quantity == "rate" else quantity
    return f"{LOG_PREFIX}/{kind}/{site_name(handle.site.key)}"


def site_groups(keys: Sequence[str], max_ungrouped: int = 10) -> dict[str, list[str]]:
    """Sites grouped for plotting: keys that differ only in their numbers (``encoder.layers.3.linear1:output``
    and ``encoder.layers.7.linear1:output``) share a group; up to ``max_ungrouped`` sites stay in one group.

    >>> site_groups(["fc1.output", "fc2.output"])
    {'all sites': ['fc1.output', 'fc2.output']}
    >>> keys = [f"layers.{i}.{n}.output" for i in range(6) for n in ("attn", "mlp")]
    >>> {k: len(v) for k, v in site_groups(keys).items()}
    {'layers.#.attn.output': 6, 'layers.#.mlp.output': 6}
    """
    if len(keys) <= max_ungrouped:
        return {"all sites": list(keys)}
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(re.sub(r"\d+", "#", key), []).append(key)
    return groups


def scalar_layout(handles: Sequence[SiteHandle], fractions: bool) -> dict[str, list[Any]]:
    """The Custom Scalars charts of one category: ``{title: ["Multiline", [tag regexes]]}``."""
    keys: dict[str, list[str]] = {"rate": [], "learned": [], "fraction": []}
    for handle in handles:
        keys[rate_kind(handle)].append(site_name(handle.site.key))
        if fractions and handle.module is not None:
            keys["fraction"].append(site_name(handle.site.key))
    labels = {"rate": "rate", "learned": "learned rate", "fraction": "dropped fraction"}
    charts: dict[str, list[Any]] = {}
    for quantity, chosen in keys.items():
        for group, members in site_groups(chosen).items() if chosen else ():
            tags = [re.escape(f"{LOG_PREFIX}/{quantity}/{k}") for k in members]
            charts[f"{labels[quantity]}: {group}"] = ["Multiline", tags]
    return charts


def gap_layout(validation: dict[str, str], dropout_on: bool = True) -> dict[str, list[Any]]:
    """The Custom Scalars charts of :class:`~lightning_dropout.monitor.GapMonitor`: per metric, one chart that
    overlays its validation value, the clean training value and (``dropout_on``) the dropout-on training value.
    ``validation`` maps each metric's base name to its validation tag (``{"acc": "val_acc"}``).

    >>> gap_layout({"acc": "val_acc"})
    {'acc: val, train_clean, train_dropout': ['Multiline', ['val_acc', 'train_clean/acc', 'train_dropout/acc']]}
    """
    kinds = ("train_clean", "train_dropout") if dropout_on else ("train_clean",)
    return {
        f"{base}: {', '.join(('val', *kinds))}": [
            "Multiline",
            [re.escape(tag)] + [re.escape(f"{k}/{base}") for k in kinds],
        ]
        for base, tag in validation.items()
    }


def write_layout(writer: Any, category: str, charts: dict[str, list[Any]]) -> None:
    """Add ``charts`` under ``category`` to the Custom Scalars layout of ``writer`` (a ``SummaryWriter``) and write
    the whole layout again: TensorBoard shows only a run's last layout, so each callback that writes one (several
    named injectors, the GapMonitor) adds to what the others wrote instead of replacing it."""
    if not charts:
        return
    layout: dict[str, dict[str, list[Any]]] = getattr(writer, _LAYOUT_ATTR, None) or {}
    layout[category] = {**layout.get(category, {}), **charts}
    setattr(writer, _LAYOUT_ATTR, layout)
    writer.add_custom_scalars(layout)
