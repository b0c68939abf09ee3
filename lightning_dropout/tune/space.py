"""The search space: groups of dropout sites, sampled define-by-run into a DropoutPlan (the Optuna layer).

Each :class:`SearchGroup` selects sites like a :class:`~lightning_dropout.injection.Rule` and says what may go
there. For every group the trial first chooses the variant, then that variant's rate and its own parameters
(a conditional space: ``dropblock``'s ``block_size`` exists only when ``dropblock`` was chosen). A group shares
one choice across its sites (so a 50-site model is not a 100-dimensional search), or chooses per site with
``per_layer: true``; ``depth_scaling`` offers timm's linear-in-depth rates.

Optuna parameter names: ``<group>/variant``, ``<group>/<variant>/p``, ``<group>/<variant>/<param>``
(per layer: ``<group>/<site target>/...``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from torch import nn

from lightning_dropout.errors import DropoutConfigError, check_instance, check_rate, closest, strict_init
from lightning_dropout.injection import Rule, resolve
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.variants import get_variant

__all__ = [
    "RULE_CHOICES",
    "Dimension",
    "SearchGroup",
    "all_dimensions",
    "check_enqueued",
    "format_space",
    "space_dimensions",
    "suggest_plan",
    "uniform_params",
]

_SELECT_KEYS = ("match", "name", "regex", "exclude", "replace", "where", "exclude_output_layer")


RULE_CHOICES = ("depth_scaling",)
"""The fields of a :class:`SearchGroup` that list choices for the :class:`~lightning_dropout.Rule` field of the
same name (not a variant's): each with more than one choice is a dimension ``<group>/<field>``, sampled once
per group, and an HParams column. A new one is its field here and its name in this tuple."""


@strict_init
@dataclass
class SearchGroup:
    """One group of dropout sites and what the tuner may put there.

    Args:
        name: the group's name, used in Optuna parameter names and reports.
        select: the site selectors of a :class:`~lightning_dropout.injection.Rule` (``match``, ``name``, ``regex``,
            ``exclude``, ``replace``, ``where``, ``exclude_output_layer``).
        variants: the variants to choose from (first chosen, then its parameters).
        p: ``[low, high]`` range of the rate; ``low`` may be 0 (no dropout in this group).
        log: sample the rate on a log scale (needs ``low > 0``).
        per_layer: choose variant and rate per site instead of once for the whole group.
        params: per variant, the choices of its own parameters, e.g. ``{"dropblock": {"block_size": [3, 5]}}``.
        depth_scaling: choices among ``"none"`` and ``"linear"`` (rates ``linspace(0, p, n)`` over the group).
    """

    name: str
    select: dict[str, Any] = field(default_factory=dict)
    variants: list[str] = field(default_factory=lambda: ["standard"])
    p: list[float] = field(default_factory=lambda: [0.0, 0.5])
    log: bool = False
    per_layer: bool = False
    params: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    depth_scaling: list[str] = field(default_factory=lambda: ["none"])

    def __post_init__(self) -> None:
        where = f"dropout.groups[{self.name!r}]"
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise DropoutConfigError(
                f"{where}: `name` must be a non-empty string without '/', but got {self.name!r}."
            )
        unknown = sorted(set(self.select) - set(_SELECT_KEYS))
        if unknown:
            raise DropoutConfigError(
                f"{where}: `select` takes {list(_SELECT_KEYS)}, but got unknown {unknown}."
            )
        if not self.variants:
            raise DropoutConfigError(f"{where}: `variants` must list at least one variant, but got [].")
        for v in self.variants:
            try:
                get_variant(v)
            except DropoutConfigError as err:
                raise DropoutConfigError(f"{where}: {err}") from None
        if len(self.p) != 2:
            raise DropoutConfigError(f"{where}: `p` must be [low, high], but got p={self.p!r}.")
        low, high = check_rate(self.p[0], "p[0]"), check_rate(self.p[1], "p[1]")
        if low > high:
            raise DropoutConfigError(f"{where}: `p` must satisfy low <= high, but got p={self.p!r}.")
        if self.log and low <= 0:
            raise DropoutConfigError(f"{where}: `log: true` needs p[0] > 0, but got p={self.p!r}.")
        self.p = [low, high]
        for variant, choices in self.params.items():
            if variant not in self.variants:
                raise DropoutConfigError(
                    f"{where}: `params` names variant {variant!r}, which is not in "
                    f"`variants` {self.variants}."
                )
            allowed = get_variant(variant).param_names()
            for param, values in choices.items():
                if param not in allowed:
                    raise DropoutConfigError(
                        f"{where}: variant {variant!r} takes the parameters {allowed}, but "
                        f"`params` gives {param!r}."
                    )
                if not isinstance(values, list) or not values:
                    raise DropoutConfigError(
                        f"{where}: `params.{variant}.{param}` must be a non-empty list of "
                        f"choices, but got {values!r}."
                    )
            self._check_choices(where, variant, choices)
        if self.per_layer and list(self.depth_scaling) != ["none"]:
            raise DropoutConfigError(
                f"{where}: `depth_scaling` scales one shared rate over the group's sites, so with `per_layer: true`"
                f" it must be ['none'], but got {self.depth_scaling!r}."
            )
        for choice in self.depth_scaling:
            if choice not in ("none", "linear"):
                raise DropoutConfigError(
                    f"{where}: `depth_scaling` choices must be 'none' or 'linear', but got {choice!r}."
                )
        self.rule(self.variants[0], self.probe_rate)  # selectors validated once, here

    def _check_choices(self, where: str, variant: str, choices: Mapping[str, list[Any]]) -> None:
        """Every choice of every parameter passes the variant's check (beside the first choice of the others): a
        bad choice is found here, not when a trial happens to draw it."""
        first = {k: v[0] for k, v in choices.items()}
        for param, values in choices.items():
            for i, value in enumerate(values):
                try:
                    get_variant(variant).check_params(self.probe_rate, {**first, param: value})
                except DropoutConfigError as err:
                    raise DropoutConfigError(
                        f"{where}: `params.{variant}.{param}[{i}]` must be a value variant {variant!r} accepts "
                        f"({str(err).rstrip('.')}), but got {value!r}."
                    ) from None

    @property
    def probe_rate(self) -> float:
        """A rate > 0 in the group's range (its upper end, or 0.1 when that is 0), to resolve which sites the
        group selects: a rule at rate 0 would inject nothing."""
        return max(self.p[1], 0.1)

    def rule(
        self,
        variant: str,
        p: float,
        params: Mapping[str, Any] | None = None,
        only: str | None = None,
        **choices: Any,
    ) -> Rule:
        """The Rule this group stands for with the given choices: the variant, its rate and parameters, and the
        group's other searched choices, each a field of :class:`~lightning_dropout.Rule` (``depth_scaling``).
        ``only``: restrict it to one site target."""
        select = dict(self.select)
        if only is not None:
            select.update(name=[only], regex=None, exclude=None, exclude_output_layer=False)
        return Rule(variant=variant, p=p, params=dict(params or {}), **choices, **select)

    def probe_plan(self, variant: str, model: nn.Module, example_input: Any = None) -> DropoutPlan:
        """The sites ``variant`` would get in ``model``: the group at its :attr:`probe_rate` with the first choice
        of each of the variant's parameters (the one probe behind ``targets``, ``describe``'s sites, the HParams
        columns and the checks before trial 0)."""
        params = {k: v[0] for k, v in self.params.get(variant, {}).items()}
        return resolve(model, [self.rule(variant, self.probe_rate, params)], example_input)

    def probe(self, model: nn.Module, example_input: Any = None) -> dict[str, DropoutPlan]:
        """:meth:`probe_plan` of every variant of the group, in the group's order."""
        return {variant: self.probe_plan(variant, model, example_input) for variant in self.variants}

    def targets(self, model: nn.Module, example_input: Any = None) -> list[str]:
        """The site targets the group selects in ``model``, in model order."""
        plan = self.probe_plan(self.variants[0], model, example_input)
        return list(dict.fromkeys(s.target for s in plan))


@dataclass(frozen=True)
class Dimension:
    """One Optuna parameter a group suggests: the one description of the search space that sampling
    (:func:`suggest_plan`), the uniform design (:func:`uniform_params`), ``describe`` (:func:`space_dimensions`)
    and the check of ``study.enqueue`` all read.

    Attributes:
        name: the Optuna parameter name (``<prefix>/variant``, ``<prefix>/<variant>/p``, ...).
        key: what it sets: ``variant``, ``p``, a variant parameter's name, or ``depth_scaling``.
        distribution: its Optuna distribution.
        variant: the variant it belongs to (suggested only when that variant is chosen); ``None`` for those
            suggested whatever the variant.
    """

    name: str
    key: str
    distribution: optuna.distributions.BaseDistribution
    variant: str | None = None

    @property
    def fixed(self) -> bool:
        """A choice with one value: suggested (so a plan's parameters are complete) but not searched."""
        dist = self.distribution
        return isinstance(dist, optuna.distributions.CategoricalDistribution) and len(dist.choices) == 1

    @property
    def first(self) -> Any:
        """The uniform design's value: the first choice (a rate has none: :func:`uniform_params` clips one)."""
        dist = self.distribution
        return dist.choices[0] if isinstance(dist, optuna.distributions.CategoricalDistribution) else None

    def domain(self) -> str:
        """``{'standard', 'gaussian'}``, ``[0, 0.3]``, ``[0.01, 0.5] log``."""
        dist = self.distribution
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return "{" + ", ".join(repr(c) for c in dist.choices) + "}"
        assert isinstance(dist, optuna.distributions.FloatDistribution)
        return f"[{dist.low:g}, {dist.high:g}]" + (" log" if dist.log else "")

    def suggest(self, trial: optuna.Trial) -> Any:
        """Ask ``trial`` for this dimension's value."""
        dist = self.distribution
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return trial.suggest_categorical(self.name, dist.choices)
        assert isinstance(dist, optuna.distributions.FloatDistribution)
        return trial.suggest_float(self.name, dist.low, dist.high, log=dist.log)

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is in the domain (what an enqueued trial may give)."""
        dist = self.distribution
        try:
            internal = dist.to_internal_repr(value)  # a categorical's index: raises for another value
        except (TypeError, ValueError):
            return False
        if isinstance(dist, optuna.distributions.FloatDistribution):
            return bool(dist.low <= internal <= dist.high)
        return True


def _dimensions(group: SearchGroup, prefix: str) -> list[Dimension]:
    """The dimensions ``group`` suggests under ``prefix``, in suggestion order (the variant, then each variant's
    rate and parameters, then ``depth_scaling``)."""
    cat, flt = optuna.distributions.CategoricalDistribution, optuna.distributions.FloatDistribution
    dims = [Dimension(f"{prefix}/variant", "variant", cat(group.variants))]
    low, high = group.p
    for variant in group.variants:
        if low != high:
            dims.append(Dimension(f"{prefix}/{variant}/p", "p", flt(low, high, log=group.log), variant))
        for key, choices in sorted(group.params.get(variant, {}).items()):
            dims.append(Dimension(f"{prefix}/{variant}/{key}", key, cat(choices), variant))
    for key in RULE_CHOICES:
        values = getattr(group, key)
        if len(values) > 1:
            dims.append(Dimension(f"{prefix}/{key}", key, cat(values)))
    return dims


def _prefixes(group: SearchGroup, model: nn.Module, example_input: Any = None) -> list[str]:
    """The parameter-name prefixes of ``group`` on ``model``: one per site target with ``per_layer``, else
    the group's name."""
    if group.per_layer:
        return [f"{group.name}/{t}" for t in group.targets(model, example_input)]
    return [group.name]


def all_dimensions(
    groups: Sequence[SearchGroup], model: nn.Module, example_input: Any = None
) -> list[Dimension]:
    """Every dimension the groups can suggest on ``model``, in suggestion order."""
    return [
        dim
        for group in groups
        for prefix in _prefixes(group, model, example_input)
        for dim in _dimensions(group, prefix)
    ]


def _choose(
    trial: optuna.Trial, prefix: str, group: SearchGroup
) -> tuple[str, float, dict[str, Any], dict[str, Any]]:
    """Suggest ``group``'s dimensions under ``prefix``: (variant, rate, the variant's parameters, the group's
    other choices by Rule field). A choice with one value has no dimension: its value is the group's field's."""
    dims = _dimensions(group, prefix)
    variant = dims[0].suggest(trial)
    p = group.p[0]  # a range of one value
    params: dict[str, Any] = {}
    choices: dict[str, Any] = {key: getattr(group, key)[0] for key in RULE_CHOICES}
    for dim in dims[1:]:
        if dim.variant is None:
            choices[dim.key] = dim.suggest(trial)
        elif dim.variant == variant and dim.key == "p":
            p = dim.suggest(trial)
        elif dim.variant == variant:
            params[dim.key] = dim.suggest(trial)
    return variant, p, params, choices


def check_enqueued(
    groups: Sequence[SearchGroup],
    model: nn.Module,
    params: Mapping[str, Any],
    where: str,
    example_input: Any = None,
) -> None:
    """Raise unless every Optuna parameter of an enqueued trial (``study.enqueue``'s ``params``) is one of the
    space's dimensions and its value is in that dimension's domain: found before the first trial, not when
    the enqueued trial runs."""
    dims = {dim.name: dim for dim in all_dimensions(groups, model, example_input)}
    for name, value in params.items():
        dim = dims.get(name)
        if dim is None:
            near = closest(name, dims)
            raise DropoutConfigError(
                f"{where}: `{name}` must be a parameter of the search space, but it is not; "
                + (f"nearest: {near}." if near else f"the parameters: {list(dims)}.")
            )
        if not dim.admits(value):
            raise DropoutConfigError(f"{where}: `{name}` must be in {dim.domain()}, but got {value!r}.")


def suggest_plan(
    trial: optuna.Trial, groups: Sequence[SearchGroup], model: nn.Module, example_input: Any = None
) -> DropoutPlan:
    """Sample one plan for ``model`` from ``groups`` (define-by-run). An injecting group whose rate is 0 adds no
    site; a replacing group at 0 switches the model's own dropout off."""
    check_instance(model, nn.Module, "model", "suggest_plan(trial, groups, model)", "an nn.Module")
    if isinstance(groups, SearchGroup) or not isinstance(groups, Sequence):
        raise DropoutConfigError(
            "`suggest_plan(trial, groups, model)` takes a list of SearchGroup as `groups`, but got "
            f"{type(groups).__name__} {groups!r:.60}."
        )
    for group in groups:
        check_instance(group, SearchGroup, "groups[...]", "suggest_plan(trial, groups, model)")
    rules: list[Rule] = []
    for group in groups:
        if group.per_layer:
            for target in group.targets(model, example_input):
                variant, p, params, choices = _choose(trial, f"{group.name}/{target}", group)
                if p > 0 or group.select.get("replace"):  # a replaced dropout at p=0 is switched off
                    rules.append(group.rule(variant, p, params, only=target, **choices))
        else:
            variant, p, params, choices = _choose(trial, group.name, group)
            if p > 0 or group.select.get("replace"):
                rules.append(group.rule(variant, p, params, **choices))
    return resolve(model, rules, example_input) if rules else DropoutPlan()


def uniform_params(
    groups: Sequence[SearchGroup], model: nn.Module, rate: float, example_input: Any = None
) -> dict[str, Any]:
    """The Optuna parameters of the uniform design at ``rate``: every group (every site of a ``per_layer``
    group) at its first variant, with ``rate`` clipped into the group's ``p`` range, the first choice of each
    variant parameter and of ``depth_scaling``. Enqueued, they make :func:`suggest_plan` return that plan.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> group = SearchGroup("hidden", {"match": "Linear"}, ["standard", "gaussian"], p=[0.0, 0.3])
        >>> uniform_params([group], net, 0.5)
        {'hidden/variant': 'standard', 'hidden/standard/p': 0.3}
    """
    params: dict[str, Any] = {}
    for group in groups:
        variant = group.variants[0]
        low, high = group.p
        for prefix in _prefixes(group, model, example_input):
            for dim in _dimensions(group, prefix):
                if dim.variant not in (None, variant):
                    continue
                params[dim.name] = min(max(float(rate), low), high) if dim.key == "p" else dim.first
    return params


def space_dimensions(group: SearchGroup, model: nn.Module, example_input: Any = None) -> dict[str, str]:
    """The Optuna parameters ``group`` can set on ``model`` (those :func:`suggest_plan` suggests; a variant's
    own parameters only when that variant is chosen), each with its domain, in suggestion order. A choice
    with one value is fixed, not a dimension, and is left out.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> group = SearchGroup("hidden", {"match": "Linear"}, ["standard", "gaussian"], p=[0.0, 0.3])
        >>> space_dimensions(group, net)
        {'hidden/variant': "{'standard', 'gaussian'}", 'hidden/standard/p': '[0, 0.3]', 'hidden/gaussian/p': '[0, 0.3]'}
    """
    return {
        dim.name: dim.domain()
        for prefix in _prefixes(group, model, example_input)
        for dim in _dimensions(group, prefix)
        if not dim.fixed
    }


def _group_sites(group: SearchGroup, model: nn.Module, example_input: Any = None) -> list[str]:
    """Every site key the group can produce (``fc1:output``; ``fc1:weight`` for DropConnect), in model order."""
    keys: dict[str, None] = {}
    for plan in group.probe(model, example_input).values():
        keys.update(dict.fromkeys(site.key for site in plan))
    return list(keys)


def format_space(groups: Sequence[SearchGroup], model: nn.Module, example_input: Any = None) -> str:
    """A preview of the search space (``lightning-dropout describe`` on a tuning config): each group, the
    sites it matches in ``model``, and its search dimensions (the Optuna parameters and their domains)."""
    lines: list[str] = []
    total_sites: dict[str, None] = {}
    total = 0
    for group in groups:
        sites = _group_sites(group, model, example_input)
        total_sites.update(dict.fromkeys(sites))
        dims = space_dimensions(group, model, example_input)
        total += len(dims)
        how = "one choice per site" if group.per_layer else "one choice for the group"
        scaling = f", depth_scaling {group.depth_scaling}" if group.depth_scaling != ["none"] else ""
        lines.append(
            f"group {group.name}: variants {group.variants}, p [{group.p[0]:g}, {group.p[1]:g}]"
            f"{' (log)' if group.log else ''}, {how}{scaling}"
        )
        lines.append(f"  sites ({len(sites)}): {', '.join(sites)}")
        lines.append(f"  dimensions ({len(dims)}):")
        width = max(map(len, dims), default=0)
        lines.extend(f"    {name.ljust(width)}  {domain}" for name, domain in dims.items())
    head = (
        f"search space: {len(groups)} group{'s' if len(groups) != 1 else ''}, {len(total_sites)} "
        f"site{'s' if len(total_sites) != 1 else ''}, {total} dimension{'s' if total != 1 else ''} "
        "(a variant's rate and parameters count only when that variant is chosen)"
    )
    return "\n".join([head, *lines])
