"""Rules -> plan: :func:`resolve` turns rules into a :class:`~lightning_dropout.plan.DropoutPlan` for a model,
changing nothing (torch only)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from lightning_dropout import _attr_sites as attr_sites
from lightning_dropout._state import site_records
from lightning_dropout._trace import Trace, call_model, output_layer
from lightning_dropout.errors import DropoutConfigError, check_instance, closest
from lightning_dropout.plan import DropoutPlan, Site
from lightning_dropout.rules import Rule, existing_rate, has_float_dropout, is_dropout_module
from lightning_dropout.variants import DropoutVariant, get_variant

__all__ = [
    "Bypass",
    "check_rules",
    "complete_params",
    "existing_sites",
    "float_variant",
    "functional_refusal",
    "resolve",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Rules -> plan
# ----------------------------------------------------------------------------------------------------------
def complete_params(
    site_variant: str, where: str, module: nn.Module, params: Mapping[str, Any]
) -> dict[str, Any]:
    """Fill the parameters a site can read off its target: the variant's own
    :meth:`~lightning_dropout.variants.DropoutVariant.params_from_target` (an RNN's layout, weight names)."""
    return get_variant(site_variant).params_from_target(module, where, params)


def _attention_targets(qualname: str, module: nn.Module) -> list[str]:
    if isinstance(module, nn.MultiheadAttention):
        return [qualname]
    prefix = f"{qualname}." if qualname else ""
    return [f"{prefix}{n}" for n, c in module.named_children() if isinstance(c, nn.MultiheadAttention)]


def float_variant(module: nn.Module) -> str:
    return "attention" if isinstance(module, nn.MultiheadAttention) else "standard"


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that may carry a site: not our own variants, not the insides of nn.MultiheadAttention (its
    forward calls no submodule), not containers without a forward. A module we replaced is seen as the
    original it replaced, so resolving the same rules again gives the same plan."""
    replaced = {r.site.target: r.original for r in site_records(model).values() if r.site.where == "replace"}
    inside_mha = {
        id(c)
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention)
        for c in m.modules()
        if c is not m
    }
    out = []
    for qualname, module in model.named_modules():
        if qualname in replaced:
            out.append((qualname, replaced[qualname]))
        elif (
            not isinstance(module, (DropoutVariant, nn.ModuleList, nn.ModuleDict))
            and id(module) not in inside_mha
        ):
            out.append((qualname, module))
    return out


def _original_rate(
    model: nn.Module, qualname: str, module: nn.Module, attr: str | None = None
) -> float | None:
    """The rate ``module`` had before we touched it (attribute sites change the float in place); for a rate
    attribute ``qualname`` is its path ``"<owner>.<attribute>"``."""
    record = site_records(model).get(f"{qualname}:attribute")
    if record is not None:
        return float(record.original)
    return float(getattr(module, attr)) if attr is not None else existing_rate(module)


def _site(rule: Rule, target: str, where: str, p: float, params: Mapping[str, Any] | None = None) -> Site:
    """A site of ``rule``'s variant: taken as checked when its rate and parameters are the rule's own (which
    the Rule checked once for every site it selects), else checked as any Site."""
    params = rule.params if params is None else params
    if p == rule.p and params == rule.params:
        return Site.checked(target, where, rule.variant, p, params)
    return Site(target, where, rule.variant, p, params)


def _injection_sites(rule: Rule, qualname: str, module: nn.Module) -> list[Site]:
    assert rule.p is not None  # guaranteed by Rule.__post_init__ for injecting rules
    if rule.variant == "attention":
        targets = _attention_targets(qualname, module)
        if not targets:
            raise DropoutConfigError(
                f"variant 'attention' applies to nn.MultiheadAttention or a layer holding one (nn.Transformer*Layer),"
                f" but {rule.label()} selected {qualname!r} ({type(module).__name__})."
            )
        return [_site(rule, t, "attribute", rule.p) for t in targets]
    if rule.variant == "weight":
        return [
            _site(rule, qualname, "weight", rule.p, complete_params("weight", "weight", module, rule.params))
        ]
    places = ("input", "output") if rule.where == "both" else (rule.where,)
    if "input" in places and isinstance(module, nn.Sequential):
        raise DropoutConfigError(
            f"where='input' is not supported on nn.Sequential {qualname!r}: target its first module instead."
        )
    params = complete_params(rule.variant, rule.where, module, rule.params)
    return [_site(rule, qualname, w, rule.p, params) for w in places]


def _replacement_sites(
    rule: Rule, qualname: str, module: nn.Module, model: nn.Module, attr: str | None = None
) -> list[Site]:
    explicit = rule.replace is not True or rule.strict
    if attr is not None:  # a float rate the owner applies with nn.functional.dropout or an attention kernel
        if rule.variant != "standard":
            if explicit:
                raise DropoutConfigError(functional_refusal(qualname, module, attr, rule.variant))
            return []
        p = rule.p if rule.p is not None else cast(float, _original_rate(model, qualname, module, attr))
        return [Site(qualname, "attribute", "standard", p)]
    float_site = has_float_dropout(module)
    if float_site:
        kind = float_variant(module)
        if rule.variant not in (kind, "standard"):
            if explicit:
                raise DropoutConfigError(
                    f"the float `dropout` of {type(module).__name__} {qualname!r} runs inside torch's kernel and takes "
                    f"only variant {kind!r}, but {rule.label()} asks for {rule.variant!r}."
                )
            return []
        # a float-dropout owner (MultiheadAttention/RNNBase) always has a rate
        p = rule.p if rule.p is not None else cast(float, _original_rate(model, qualname, module))
        return [Site(qualname, "attribute", kind, p)]
    p = rule.p if rule.p is not None else (existing_rate(module) or 0.0)
    return [
        _site(rule, qualname, "replace", p, complete_params(rule.variant, "replace", module, rule.params))
    ]


def functional_refusal(path: str, owner: nn.Module, attr: str, variant: str) -> str:
    return (
        f"site '{path}:attribute': {type(owner).__name__} applies its float `{attr}` functionally "
        f"(nn.functional.dropout or an attention kernel), which takes only variant 'standard', but got {variant!r}; "
        "keep 'standard' there (its rate can be set, tuned or switched off with p=0)."
    )


def _rate_owner(module: nn.Module) -> bool:
    """Whether ``module`` may own functional rate attributes (dropout modules and the float-dropout owners
    of torch are handled as such)."""
    return not (is_dropout_module(module) or has_float_dropout(module) or isinstance(module, nn.RNNBase))


@dataclass(frozen=True)
class Bypass:
    """A dropout module its owner runs past: the owner reads its ``.p`` into a kernel (fused attention), or
    never calls it; a module of another variant put in its place would never run."""

    owner_name: str
    owner: nn.Module
    why: str  # "reads the module's `.p` into scaled_dot_product_attention() instead of calling it", ...
    eager_helps: bool  # whether the owner's eager path (timm `fused_attn`, Hugging Face) calls it

    def explain(self) -> str:
        return f"{type(self.owner).__name__} {self.owner_name!r} {self.why}"


def _dropout_modules(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, live module, owner)`` of every dropout module below the root (not torch's float-dropout
    owners); the live module of a replaced one is what sits there now."""
    return [
        (q, model.get_submodule(q), model.get_submodule(q.rpartition(".")[0]))
        for q, m in _candidates(model)
        if q and is_dropout_module(m) and not has_float_dropout(m)
    ]


def _usage(
    model: nn.Module, example_input: Any = None, *, bypasses: bool = False
) -> tuple[dict[str, list[tuple[str, nn.Module, str]]], dict[str, Bypass]]:
    """What the model's forward really applies: per owner name, the ``(path, owner, attribute)`` of every float
    rate the owner applies functionally; and, with ``bypasses``, the dropout modules their owners run past.

    Rate candidates by name and value (:func:`~lightning_dropout._attr_sites.rate_attribute_candidates`). Both
    are proven by one sentinel-rate probe with ``example_input`` for the owners it runs, else by the owner's
    source (a rate passed to a dropout call; a module whose ``.p`` is read and which is never called)."""
    owners = [
        (q, m, attr_sites.rate_attribute_candidates(m)) for q, m in _candidates(model) if _rate_owner(m)
    ]
    owners = [(q, m, names) for q, m, names in owners if names]
    modules = _dropout_modules(model) if bypasses else []
    if not owners and not modules:
        return {}, {}
    probed = None
    run = lambda: call_model(model, example_input)  # noqa: E731
    if example_input is not None:
        probed = attr_sites.probe(
            model,
            run,
            [(m, n) for _, m, names in owners for n in names]
            + [(live, "p") for _, live, _ in modules if attr_sites.is_rate_value(vars(live).get("p"))],
            [m for _, m, _ in owners] + [x for _, live, owner in modules for x in (owner, live)],
        )
    found: dict[str, list[tuple[str, nn.Module, str]]] = {}
    for qualname, module, names in owners:
        for name in names:
            if attr_sites.reaches_dropout(module, name, probed):
                path = f"{qualname}.{name}" if qualname else name
                found.setdefault(qualname, []).append((path, module, name))
    passed: list[tuple[str, nn.Module, nn.Module, str]] = []  # (name, live module, owner, why)
    for qualname, live, owner in modules:
        if probed is not None and id(owner) in probed.called:
            if id(live) not in probed.called:
                kernel = probed.reached.get((id(live), "p"))
                why = (
                    f"reads the module's `.p` into {kernel}() instead of calling it"
                    if kernel is not None
                    else "runs without calling it"
                )
                passed.append((qualname, live, owner, why))
        elif attr_sites.static_bypass(cast(Any, type(owner)), qualname.rpartition(".")[2]):
            passed.append(
                (qualname, live, owner, "reads the module's `.p` and never calls it (in its source)")
            )
    ran = [(o, m) for _, m, o, _ in passed if probed is not None and id(o) in probed.called]
    helps = attr_sites.eager_calls(model, run, ran) if ran else set()
    bypassed = {
        q: Bypass(q.rpartition(".")[0], owner, why, id(live) in helps) for q, live, owner, why in passed
    }
    return found, bypassed


def _selected(
    rule: Rule,
    model: nn.Module,
    excluded: set[str],
    rates: dict[str, list[tuple[str, nn.Module, str]]] | None = None,
) -> list[tuple[str, nn.Module, str | None]]:
    """``(name, module, rate attribute or None)`` of every site ``rule`` selects; for rate attributes the
    name is ``"<owner>.<attribute>"`` (what ``name``/``regex`` globs see) and the module is the owner."""
    picked: list[tuple[str, nn.Module, str | None]] = []
    for qualname, module in _candidates(model):
        owned = (rates or {}).get(qualname, [])
        if rule.replace is None:
            if qualname in excluded or is_dropout_module(module) or (qualname == "" and rule.name is None):
                continue
        elif rule.replace is True or (owned and isinstance(module, rule.replace)):
            picked.extend((path, module, attr) for path, module, attr in owned if rule.selects(path, module))
            if not (is_dropout_module(module) or has_float_dropout(module)):
                continue
        elif not isinstance(module, rule.replace):
            continue
        if rule.replace is not None and qualname == "":
            continue
        if rule.selects(qualname, module):
            picked.append((qualname, module, None))
    return picked


def _no_match_error(rule: Rule, index: int, model: nn.Module) -> DropoutConfigError:
    names = [n for n, _ in model.named_modules() if n]
    probe = (rule.name or [rule.regex or ""])[0] if (rule.name or rule.regex) else ""
    probe = probe.replace("*", "").replace("?", "").strip(".") if probe else ""
    near = (closest(probe, names) if probe else []) or names[:5]
    types = sorted({type(m).__name__ for _, m in model.named_modules()})
    return DropoutConfigError(
        f"rules[{index}] {rule.label()} must match at least one module of {type(model).__name__}, but matches none;"
        f" closest module names: {near}; module types present: {types}."
    )


def check_rules(rules: Any, call: str) -> None:
    """``rules`` must be a Rule or a sequence of Rules / mappings of Rule arguments."""
    items = [rules] if isinstance(rules, (Rule, Mapping)) else rules
    if isinstance(rules, (str, bytes)) or not isinstance(items, Sequence):
        items = [rules]
    for item in items:
        if not isinstance(item, (Rule, Mapping)):
            hint = f"; for a module class write Rule(match={item!r}, p=...)" if isinstance(item, str) else ""
            raise DropoutConfigError(
                f"`{call}` takes Rule objects (or mappings of their arguments) as `rules`, but got {item!r} "
                f"({type(item).__name__}){hint}."
            )


def existing_sites(model: nn.Module, example_input: Any = None) -> list[tuple[Site, nn.Module, str]]:
    """``(site, module, kind)`` for the dropout ``model`` has of its own: the sites ``Rule(replace=True)``
    resolves to, at the model's own rates, with the dropout module (the owner, for a rate attribute) and how the
    model applies it: ``"module"``, ``"bypassed"`` (a fused kernel reads its ``.p``, or its owner never calls
    it) or ``"rate attribute"``."""
    rates, bypasses = _usage(model, example_input, bypasses=True)
    everything = Rule(replace=True)
    out = []
    for qualname, module, attr in _selected(everything, model, set(), rates):
        for site in _replacement_sites(everything, qualname, module, model, attr):
            if site.where == "attribute":
                kind = "rate attribute"
            else:
                kind = "bypassed" if qualname in bypasses else "module"
            out.append((site, module, kind))
    return out


def _few(names: list[str]) -> str:
    return f"{names[:3]}{' ...' if len(names) > 3 else ''}"


def _left_alone(rule: Rule, skipped: list[str], bypassed: list[tuple[str, Bypass]]) -> tuple[str, str]:
    """What a rule leaves as it is, and why and how to act on it: ``(what, why)`` for its message."""
    parts, reasons = [], []
    if skipped:
        parts.append(f"{len(skipped)} float rates the model applies functionally ({_few(skipped)})")
        reasons.append(
            "those rates take only variant 'standard' (add a Rule(replace=True, variant='standard') to set or "
            "tune them)"
        )
    if bypassed:
        first = bypassed[0][1]
        hint = attr_sites.bypass_hint(first.owner, first.eager_helps).removeprefix("or ")
        parts.append(
            f"{len(bypassed)} dropout modules their owners run past ({_few([q for q, _ in bypassed])})"
        )
        reasons.append(f"{first.explain()}, so variant {rule.variant!r} would never run there; {hint}")
    return " and ".join(parts), "; ".join(reasons)


def resolve(
    model: nn.Module,
    rules: Sequence[Rule],
    example_input: Any = None,
    *,
    eager: bool = False,
    _traced: Trace | None = None,
) -> DropoutPlan:
    """Turn ``rules`` into a :class:`~lightning_dropout.plan.DropoutPlan` for ``model`` (nothing is changed).

    A ``replace=True`` rule with a variant other than ``standard`` leaves the sites where that variant cannot
    act as they are, with one warning naming them: float rates applied functionally, and dropout modules
    their owner runs past (fused attention reads their ``.p``; seen by a training-mode probe with
    ``example_input``, else in the owner's source), unless ``eager`` and the owner's eager path calls them.
    With ``strict=True`` on the rule such sites are kept and refused in one line instead.

    Args:
        model: any ``nn.Module`` (already injected modules are looked through).
        rules: the rules, applied in order; a later rule overrides an earlier one on the same site.
        example_input: optional input (tensor, tuple of positional args, or dict of kwargs); when given, the
            output layer is found by execution order.
        eager: whether the plan will be applied with ``eager=True`` (see
            :func:`~lightning_dropout.injection.apply_plan`): bypassed modules whose owner's eager path calls
            them are kept.

    Raises:
        DropoutConfigError: a rule matches nothing (with the closest module names) or a variant cannot
            apply to a selected module.
    """
    check_instance(model, nn.Module, "model", "resolve(model, rules)", "an nn.Module")
    if isinstance(rules, Rule):
        rules = [rules]
    check_rules(rules, "resolve(model, rules)")
    rules = [r if isinstance(r, Rule) else Rule(**r) for r in rules]
    wants_head = any(r.exclude_output_layer for r in rules)
    head = output_layer(model, example_input, _traced=_traced) if wants_head else None
    lenient = [r.replace is True and r.variant != "standard" and not r.strict for r in rules]
    rates, bypasses = (
        _usage(model, example_input, bypasses=any(lenient))
        if any(r.replace is not None for r in rules)
        else ({}, {})
    )
    sites: list[Site] = []
    for index, rule in enumerate(rules):
        excluded = {head} if (rule.exclude_output_layer and head is not None) else set()
        picked = _selected(rule, model, excluded, rates)
        new: list[Site] = []
        skipped: list[str] = []
        bypassed: list[tuple[str, Bypass]] = []
        for qualname, module, attr in picked:
            if rule.replace is None:
                new.extend(_injection_sites(rule, qualname, module))
                continue
            bypass = bypasses.get(qualname) if attr is None and lenient[index] else None
            if bypass is not None and not (eager and bypass.eager_helps):
                if (rule.p if rule.p is not None else existing_rate(module) or 0.0) > 0:
                    bypassed.append((qualname, bypass))
                continue
            found = _replacement_sites(rule, qualname, module, model, attr)
            if (
                not found
                and attr is not None
                and (rule.p if rule.p is not None else getattr(module, attr)) > 0
            ):
                skipped.append(qualname)
            new.extend(found)
        if not new and (skipped or bypassed):
            what, why = _left_alone(rule, skipped, bypassed)
            raise DropoutConfigError(f"rules[{index}] {rule.label()} selects only {what}: {why}.")
        if not new:
            raise _no_match_error(rule, index, model)
        if skipped or bypassed:
            what, why = _left_alone(rule, skipped, bypassed)
            warnings.warn(
                f"rules[{index}] {rule.label()} leaves {what} as they are: {why}; strict=True refuses them instead.",
                UserWarning,
                stacklevel=2,
            )
        if rule.depth_scaling == "linear" and len(new) > 1:
            n = len(new)
            new = [s.scaled(i / (n - 1)) for i, s in enumerate(new)]
        sites.extend(new)
    plan = DropoutPlan(sites)
    log.debug("resolved %d rules into %d sites", len(rules), len(plan))
    return plan
