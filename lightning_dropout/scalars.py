"""What a site logs, and how TensorBoard groups it: the ``dropout/...`` scalar tags of each site and the
"Custom Scalars" layout that puts the sites of a group on one chart per quantity (torch only)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_dropout.handles import SiteHandle
from lightning_dropout.variants import ConcreteDropout

__all__ = ["LOG_PREFIX", "rate_tag", "scalar_layout", "site_groups"]

LOG_PREFIX = "dropout"


def rate_kind(handle: SiteHandle) -> str:
    """``learned`` for concrete sites (the optimizer sets their rate), ``rate`` for the others."""
    return "learned" if isinstance(handle.module, ConcreteDropout) else "rate"


def rate_tag(handle: SiteHandle, quantity: str) -> str:
    """``dropout/rate/<site>``, ``dropout/fraction/<site>``; learned (concrete) rates are ``dropout/learned/<site>``."""
    return f"{LOG_PREFIX}/{rate_kind(handle) if quantity == 'rate' else quantity}/{handle.site.key}"


def site_groups(keys: Sequence[str], max_ungrouped: int = 10) -> dict[str, list[str]]:
    """Sites grouped for plotting: keys that differ only in their numbers (``encoder.layers.3.linear1:output``
    and ``encoder.layers.7.linear1:output``) share a group; up to ``max_ungrouped`` sites stay in one group.

    >>> site_groups(["fc1:output", "fc2:output"])
    {'all sites': ['fc1:output', 'fc2:output']}
    >>> keys = [f"layers.{i}.{n}:output" for i in range(6) for n in ("attn", "mlp")]
    >>> {k: len(v) for k, v in site_groups(keys).items()}
    {'layers.#.attn:output': 6, 'layers.#.mlp:output': 6}
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
        keys[rate_kind(handle)].append(handle.site.key)
        if fractions and handle.module is not None:
            keys["fraction"].append(handle.site.key)
    labels = {"rate": "rate", "learned": "learned rate", "fraction": "dropped fraction"}
    charts: dict[str, list[Any]] = {}
    for quantity, chosen in keys.items():
        for group, members in site_groups(chosen).items() if chosen else ():
            tags = [re.escape(f"{LOG_PREFIX}/{quantity}/{k}") for k in members]
            charts[f"{labels[quantity]}: {group}"] = ["Multiline", tags]
    return charts
