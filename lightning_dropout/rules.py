"""Rules: what counts as dropout in a model we did not write, and :class:`Rule`, which says where dropout
goes, which variant and which rate (torch only).

Rules are turned into a plan by :func:`~lightning_dropout.injection.resolve` (in
:mod:`lightning_dropout._resolve`).
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_dropout.errors import DropoutConfigError, closest, strict_init
from lightning_dropout.variants import DropoutVariant, get_variant

__all__ = ["Rule", "as_rules", "existing_rate", "has_float_dropout", "is_dropout_module", "is_leaf"]

_PLACEMENTS = ("output", "input", "both")
_DEPTH_SCALINGS = ("none", "linear")


# ----------------------------------------------------------------------------------------------------------
# What counts as dropout in a model we did not write
# ----------------------------------------------------------------------------------------------------------
def is_dropout_module(module: nn.Module) -> bool:
    """Whether ``module`` is a dropout module: torch's ``nn.Dropout*``/``nn.AlphaDropout`` family, one of our
    variants, or a module that carries a float ``drop_prob`` (timm's ``DropPath``/``DropBlock2d``) or is a
    torchvision ``StochasticDepth``/``DropBlock`` (a float ``p`` from ``torchvision.ops``)."""
    if isinstance(module, (_DropoutNd, DropoutVariant)):
        return True
    if isinstance(getattr(module, "drop_prob", None), float):
        return True
    return type(module).__module__.startswith("torchvision.ops") and isinstance(
        getattr(module, "p", None), float
    )


def existing_rate(module: nn.Module) -> float | None:
    """The rate an existing dropout module (or float-dropout owner) uses, or ``None``."""
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        return float(module.dropout)
    for attr in ("p", "drop_prob"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def has_float_dropout(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    return isinstance(module, nn.RNNBase) and module.num_layers > 1


def _user_children(module: nn.Module) -> list[nn.Module]:
    return [c for c in module.children() if not isinstance(c, DropoutVariant)]


def is_leaf(module: nn.Module) -> bool:
    return not _user_children(module)


# ----------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------
def _resolve_type(spec: Any, field_name: str) -> type[nn.Module]:
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec
    if not isinstance(spec, str):
        raise DropoutConfigError(f"`{field_name}` must name nn.Module classes, but got {spec!r}.")
    if "." not in spec:
        found = getattr(nn, spec, None)
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
        choices = [
            n for n in dir(nn) if isinstance(getattr(nn, n), type) and issubclass(getattr(nn, n), nn.Module)
        ]
        raise DropoutConfigError(
            f"`{field_name}` names a class in torch.nn or by its import path ('pkg.module.Class'), but got "
            f"{spec!r}; nearest in torch.nn: {closest(spec, choices)}."
        )
    module_name, _, cls_name = spec.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise DropoutConfigError(
            f"`{field_name}` must be an importable nn.Module class, but got {spec!r}."
        ) from None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise DropoutConfigError(f"`{field_name}` must be an nn.Module class, but {spec!r} is {found!r}.")
    return found


def _as_types(spec: Any, field_name: str) -> tuple[type[nn.Module], ...]:
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise DropoutConfigError(f"`{field_name}` must name at least one class, but got {spec!r}.")
    return tuple(_resolve_type(s, field_name) for s in items)


def _as_globs(spec: Any, field_name: str) -> tuple[str, ...]:
    if spec is None:
        return ()
    items = list(spec) if isinstance(spec, Iterable) and not isinstance(spec, (str, bytes)) else [spec]
    if not all(isinstance(s, str) for s in items):
        raise DropoutConfigError(f"`{field_name}` must be a glob string or a list of them, but got {spec!r}.")
    return tuple(items)


@strict_init
@dataclass
class Rule:
    """Where dropout goes, which variant and which rate; resolved against a model into plan sites.

    A rule either *injects* (give ``match``, ``name`` and/or ``regex``: every module passing all the given
    filters gets a site) or *replaces* existing dropout (give ``replace``). Later rules override earlier
    ones on the same site.

    Args:
        variant: a registered variant name (``"standard"``, ``"spatial"``, ...).
        p: the rate. For ``replace`` rules ``None`` keeps each replaced module's own rate.
        match: module class(es), as classes or names (``"Linear"`` for ``torch.nn.Linear``, or
            ``"pkg.module.Class"``); subclasses match too.
        name: glob(s) on qualified module names (``"encoder.layers.*.linear1"``).
        regex: a regular expression that must match a whole qualified module name.
        exclude: glob(s) of qualified names never to touch.
        replace: ``True`` for every dropout the model has (``nn.Dropout*``, ``nn.AlphaDropout``, timm and
            torchvision drop-path/drop-block modules, the float ``dropout`` of attention and stacked RNNs
            where the variant can take it, and float rates modules apply with ``F.dropout`` or an attention
            kernel, such as Hugging Face BART's ``dropout``/``activation_dropout`` or timm's ``drop_rate``, when
            the variant is ``standard``), or class(es) to replace, e.g. ``nn.Dropout`` or ``nn.Identity``
            placeholders (combine the latter with ``name``); a class owning such float rates gets attribute
            sites for them. ``name``/``regex`` see a float rate as ``"<module>.<attribute>"``.
        where: ``"output"`` (default), ``"input"`` or ``"both"``; ignored by ``replace`` rules and by the
            ``weight`` and ``attention`` variants, which act on weights and attention probabilities.
        params: the variant's own parameters, e.g. ``{"block_size": 5}``.
        exclude_output_layer: never put dropout after the model's final output layer (default ``True``).
        depth_scaling: ``"linear"`` scales the rate of the rule's i-th site of n by ``i / (n - 1)``
            (``linspace(0, p, n)``, timm's drop-path rule); ``"none"`` keeps ``p`` everywhere.
        strict: for ``replace=True`` rules with a variant other than ``standard``: refuse, in one line, a
            selected site where the variant cannot act (a float rate applied functionally, a dropout module a
            fused attention kernel bypasses) instead of leaving it as it is with one warning (the default).

    Example:
        >>> Rule(match="Linear", p=0.2).match
        (<class 'torch.nn.modules.linear.Linear'>,)
    """

    # The selectors are typed `Any` because jsonargparse reads these annotations to parse a YAML `rules:` list,
    # where a class is written by name ("Linear") and one value may stand for a list; __post_init__ turns them
    # into the forms `selects` reads: match and replace a tuple of module classes, name and exclude of globs.
    variant: str = "standard"
    p: float | None = None
    match: Any = None
    name: Any = None
    regex: str | None = None
    exclude: Any = None
    replace: Any = None
    where: str = "output"
    params: dict[str, Any] = field(default_factory=dict)
    exclude_output_layer: bool = True
    depth_scaling: str = "none"
    strict: bool = False

    def __post_init__(self) -> None:
        variant = get_variant(self.variant)
        for key in ("strict", "exclude_output_layer"):  # a string 'false' would read as true
            if not isinstance(getattr(self, key), bool):
                raise DropoutConfigError(
                    f"`{key}` must be true or false (not a string), but got {key}={getattr(self, key)!r}."
                )
        # the rate and the variant's parameters checked once, here, without building a module; a replacing
        # rule without `p` keeps each site's own rate, checked by its Site
        if self.p is None:
            self.params = variant.check_params(0.1, self.params)[1]
        else:
            self.p, self.params = variant.check_params(self.p, self.params)
        self.match = _as_types(self.match, "match") if self.match is not None else None
        self.name = _as_globs(self.name, "name") or None
        self.exclude = _as_globs(self.exclude, "exclude")
        if self.regex is not None:
            try:
                self._regex = re.compile(self.regex)
            except re.error as err:
                raise DropoutConfigError(
                    f"`regex` must be a valid regular expression, but got regex={self.regex!r} ({err})."
                ) from None
        if self.replace is not None and self.replace is not True:
            if self.replace is False:
                self.replace = None
            else:
                self.replace = _as_types(self.replace, "replace")
        if self.replace is None:
            if self.match is None and self.name is None and self.regex is None:
                raise DropoutConfigError(
                    "a rule must select modules with `match`, `name` or `regex`, or replace "
                    f"existing dropout with `replace`, but got {self!r}."
                )
            if self.p is None:
                raise DropoutConfigError(
                    f"an injecting rule needs a rate `p` with 0 <= p < 1, but got p=None in {self!r}."
                )
        if self.where not in _PLACEMENTS:
            raise DropoutConfigError(
                f"`where` must be one of {list(_PLACEMENTS)}, but got where={self.where!r}."
            )
        if self.depth_scaling not in _DEPTH_SCALINGS:
            raise DropoutConfigError(
                f"`depth_scaling` must be one of {list(_DEPTH_SCALINGS)}, but got depth_scaling={self.depth_scaling!r}."
            )

    def label(self) -> str:
        """A short human description used in messages."""
        parts = []
        if self.replace is True:
            parts.append("replace=True")
        elif self.replace:
            parts.append(f"replace={[t.__name__ for t in self.replace]}")
        if self.match:
            parts.append(f"match={[t.__name__ for t in self.match]}")
        if self.name:
            parts.append(f"name={list(self.name)}")
        if self.regex:
            parts.append(f"regex={self.regex!r}")
        if self.strict:
            parts.append("strict=True")
        return f"Rule({', '.join(parts)}, variant={self.variant!r})"

    def selects(self, qualname: str, module: nn.Module) -> bool:
        """Whether ``module``, named ``qualname`` in its model, passes this rule's selectors (``match``, ``name``,
        ``regex``, ``exclude``); what a ``replace`` rule replaces and which layer is the output layer are the
        engine's to decide (:func:`~lightning_dropout.injection.resolve`).

        Example:
            >>> rule = Rule(match="Linear", exclude="head", p=0.1)
            >>> rule.selects("fc1", nn.Linear(2, 2)), rule.selects("head", nn.Linear(2, 2))
            (True, False)
        """
        match: tuple[type[nn.Module], ...] | None = self.match
        names: tuple[str, ...] | None = self.name
        excluded: tuple[str, ...] = self.exclude
        if match is not None and not isinstance(module, match):
            return False
        if names is not None and not any(fnmatch.fnmatchcase(qualname, g) for g in names):
            return False
        if self.regex is not None and not self._regex.fullmatch(qualname):
            return False
        return not any(fnmatch.fnmatchcase(qualname, g) for g in excluded)


def as_rules(rules: Sequence[Rule | Mapping[str, Any]] | Rule) -> list[Rule]:
    """Rules given as Rule objects or mappings of their fields (as a config gives them), or one Rule."""
    if isinstance(rules, Rule):
        return [rules]
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise DropoutConfigError(f"`rules` must be a list of Rule, but got {rules!r}.")
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, Rule):
            out.append(rule)
        elif isinstance(rule, Mapping):
            try:
                out.append(Rule(**rule))
            except (TypeError, DropoutConfigError) as err:
                raise DropoutConfigError(f"rules[{i}]: {err}") from None
        else:
            raise DropoutConfigError(f"rules[{i}] must be a Rule or a mapping, but got {rule!r}.")
    if not out:
        raise DropoutConfigError("`rules` must hold at least one Rule, but got an empty list.")
    return out
