"""Injection engine: find dropout sites in any ``nn.Module``, attach, replace, describe and undo (torch only).

How sites are attached, and why the user's ``state_dict`` keys never change:

* ``output`` / ``input`` sites register the variant as a child named ``ld_output`` / ``ld_input`` of the
  target module and a forward hook (pre-hook) that runs it on the output (input). No module is wrapped or
  renamed, so parameter names stay as they were; a parameter-free variant adds no key at all. When the
  target is an ``nn.Sequential`` the variant is appended to it instead (a child of a Sequential is run by
  its forward), which keeps the indices of the existing layers.
* ``replace`` sites swap an existing dropout module for the variant under the same attribute name.
* ``attribute`` sites set the float ``dropout`` of ``nn.MultiheadAttention`` or of a stacked RNN (target: the
  module), or a float rate another module applies functionally, such as Hugging Face BART's
  ``self.dropout``/``self.activation_dropout`` or timm's ``self.drop_rate`` (target: ``"<module>.<attribute>"``;
  found and proven as described in ``lightning_dropout._attr_sites``). They take only the variant the
  kernel applies (``standard``; ``attention`` on ``nn.MultiheadAttention``).
* ``replace`` sites whose module the owner never calls (timm's fused ``Attention`` and Hugging Face attention
  pass ``.p`` to ``scaled_dot_product_attention``) are detected by a training-mode probe, with the example
  input at inject time or on the owner's first training forward: a non-``standard`` variant there is refused
  in one line, or, with ``eager=True``, the owner is switched to its eager path (undone by :func:`undo`).
* ``weight`` sites register a :class:`~lightning_dropout.variants.WeightDropout` child ``ld_weight`` and
  a pre/post hook pair that feeds the layer a dropped copy of its weights for one call: for torch RNNs
  through their flat weight list (the fused kernels read it), for other layers through their parameter
  slot. The parameter object and its name never change, and gradients reach it.

Every application is recorded on the root module, so :func:`undo` restores the original tree exactly and
applying the same plan twice changes nothing.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> plan = inject(model, [Rule(match=nn.Linear, p=0.2)])
    >>> [s.key for s in plan]  # the last Linear is the output layer: excluded by default
    ['0:output']
    >>> undo(model); len(model)
    3
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils.rnn import PackedSequence

from lightning_dropout import _attr_sites as attr_sites
from lightning_dropout.errors import DropoutConfigError, check_rate, closest, strict_init
from lightning_dropout.plan import DropoutPlan, Site
from lightning_dropout.variants import DropoutVariant, WeightDropout, build_variant, get_variant

__all__ = [
    "Rule",
    "SiteHandle",
    "SiteInfo",
    "applied_plan",
    "apply_plan",
    "describe",
    "existing_rate",
    "format_sites",
    "inject",
    "is_dropout_module",
    "output_layer",
    "register_rate_attribute",
    "regularization",
    "resolve",
    "site_handles",
    "undo",
]

log = logging.getLogger(__name__)

register_rate_attribute = attr_sites.register_rate_attribute

OUTPUT_CHILD = "ld_output"
INPUT_CHILD = "ld_input"
WEIGHT_CHILD = "ld_weight"
_CHILD_FOR = {"output": OUTPUT_CHILD, "input": INPUT_CHILD, "weight": WEIGHT_CHILD}
_STATE_ATTR = "_lightning_dropout_records"
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


def _has_float_dropout(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    return isinstance(module, nn.RNNBase) and module.num_layers > 1


def _user_children(module: nn.Module) -> list[nn.Module]:
    return [c for c in module.children() if not isinstance(c, DropoutVariant)]


def _is_leaf(module: nn.Module) -> bool:
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
    items = [spec] if isinstance(spec, str) else list(spec)
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

    Example:
        >>> Rule(match="Linear", p=0.2).match
        (<class 'torch.nn.modules.linear.Linear'>,)
    """

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

    def __post_init__(self) -> None:
        get_variant(self.variant)
        if self.p is not None:
            self.p = check_rate(self.p)
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
        if not isinstance(self.params, Mapping):
            raise DropoutConfigError(f"`params` must be a mapping, but got params={self.params!r}.")
        self.params = dict(self.params)
        build_variant(self.variant, self.p or 0.1, **self.params)  # validates the variant's parameters now

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
        return f"Rule({', '.join(parts)}, variant={self.variant!r})"

    def _selects(self, qualname: str, module: nn.Module) -> bool:
        if self.match is not None and not isinstance(module, self.match):
            return False
        if self.name is not None and not any(fnmatch.fnmatchcase(qualname, g) for g in self.name):
            return False
        if self.regex is not None and not self._regex.fullmatch(qualname):
            return False
        return not any(fnmatch.fnmatchcase(qualname, g) for g in self.exclude)


# ----------------------------------------------------------------------------------------------------------
# Tracing an example input: call order and shapes
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Trace:
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


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


def _trace(model: nn.Module, example_input: Any) -> _Trace:
    """Run ``example_input`` through ``model`` in eval mode with grad on (torch's Transformer inference fast
    path would skip submodules), recording leaf call order and the shapes each module sees."""
    trace = _Trace([], {}, {})
    names: dict[int, str] = {}
    for qualname, mod in model.named_modules():
        names.setdefault(id(mod), qualname)
    handles = []

    def record(mod: nn.Module, args: tuple, out: Any) -> None:
        qualname = names.get(id(mod))
        if qualname is None:
            return
        if _is_leaf(mod) and not isinstance(mod, DropoutVariant):
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
            _call(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for mod, flag in flags.items():
            mod.training = flag
    return trace


def _definition_order(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if _is_leaf(m) and not isinstance(m, DropoutVariant)]


def output_layer(model: nn.Module, example_input: Any = None, *, _traced: _Trace | None = None) -> str | None:
    """The qualified name of the model's final output layer: the last leaf module with parameters to run on
    ``example_input`` when given, else the last one defined."""
    if _traced is None and example_input is not None:
        _traced = _trace(model, example_input)
    order = _traced.order if _traced is not None else _definition_order(model)
    for qualname in reversed(order):
        if any(True for _ in model.get_submodule(qualname).parameters(recurse=False)):
            return qualname
    return None


# ----------------------------------------------------------------------------------------------------------
# Rules -> plan
# ----------------------------------------------------------------------------------------------------------
def _weight_names(module: nn.Module, params: Mapping[str, Any]) -> list[str]:
    names = params.get("weights")
    if names is None:
        if isinstance(module, nn.RNNBase):
            names = [n for n in module._flat_weights_names if n.startswith("weight_hh")]
        else:
            names = ["weight"]
    present = [n for n, _ in module.named_parameters(recurse=False)]
    missing = [n for n in names if n not in present]
    if missing:
        raise DropoutConfigError(
            f"variant 'weight' needs parameters {missing} on {type(module).__name__}, which has {present}."
        )
    return list(names)


def _complete_params(
    site_variant: str, where: str, module: nn.Module, params: Mapping[str, Any]
) -> dict[str, Any]:
    """Fill the parameters a site can read off its target (RNN layout, weight names)."""
    out = dict(params)
    if site_variant == "variational" and "batch_first" not in out and isinstance(module, nn.RNNBase):
        out["batch_first"] = bool(module.batch_first)
    if where == "weight":
        out["weights"] = _weight_names(module, out)
    return out


def _attention_targets(qualname: str, module: nn.Module) -> list[str]:
    if isinstance(module, nn.MultiheadAttention):
        return [qualname]
    prefix = f"{qualname}." if qualname else ""
    return [f"{prefix}{n}" for n, c in module.named_children() if isinstance(c, nn.MultiheadAttention)]


def _float_variant(module: nn.Module) -> str:
    return "attention" if isinstance(module, nn.MultiheadAttention) else "standard"


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that may carry a site: not our own variants, not the insides of nn.MultiheadAttention (its
    forward calls no submodule), not containers without a forward. A module we replaced is seen as the
    original it replaced, so resolving the same rules again gives the same plan."""
    replaced = {r.site.target: r.original for r in _records(model).values() if r.site.where == "replace"}
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
    record = _records(model).get(f"{qualname}:attribute")
    if record is not None:
        return float(record.original)
    return float(getattr(module, attr)) if attr is not None else existing_rate(module)


def _injection_sites(rule: Rule, qualname: str, module: nn.Module) -> list[Site]:
    assert rule.p is not None  # guaranteed by Rule.__post_init__ for injecting rules
    if rule.variant == "attention":
        targets = _attention_targets(qualname, module)
        if not targets:
            raise DropoutConfigError(
                f"variant 'attention' applies to nn.MultiheadAttention or a layer holding one (nn.Transformer*Layer),"
                f" but {rule.label()} selected {qualname!r} ({type(module).__name__})."
            )
        return [Site(t, "attribute", "attention", rule.p) for t in targets]
    if rule.variant == "weight":
        return [
            Site(
                qualname,
                "weight",
                "weight",
                rule.p,
                _complete_params("weight", "weight", module, rule.params),
            )
        ]
    places = ("input", "output") if rule.where == "both" else (rule.where,)
    if "input" in places and isinstance(module, nn.Sequential):
        raise DropoutConfigError(
            f"where='input' is not supported on nn.Sequential {qualname!r}: target its first module instead."
        )
    params = _complete_params(rule.variant, rule.where, module, rule.params)
    return [Site(qualname, w, rule.variant, rule.p, params) for w in places]


def _replacement_sites(
    rule: Rule, qualname: str, module: nn.Module, model: nn.Module, attr: str | None = None
) -> list[Site]:
    explicit = rule.replace is not True
    if attr is not None:  # a float rate the owner applies with nn.functional.dropout or an attention kernel
        if rule.variant != "standard":
            if explicit:
                raise DropoutConfigError(_functional_refusal(qualname, module, attr, rule.variant))
            return []
        p = rule.p if rule.p is not None else cast(float, _original_rate(model, qualname, module, attr))
        return [Site(qualname, "attribute", "standard", p)]
    float_site = _has_float_dropout(module)
    if float_site:
        kind = _float_variant(module)
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
        Site(
            qualname,
            "replace",
            rule.variant,
            p,
            _complete_params(rule.variant, "replace", module, rule.params),
        )
    ]


def _functional_refusal(path: str, owner: nn.Module, attr: str, variant: str) -> str:
    return (
        f"site '{path}:attribute': {type(owner).__name__} applies its float `{attr}` functionally "
        f"(nn.functional.dropout or an attention kernel), which takes only variant 'standard', but got {variant!r}; "
        "keep 'standard' there (its rate can be set, tuned or switched off with p=0)."
    )


def _rate_owner(module: nn.Module) -> bool:
    """Whether ``module`` may own functional rate attributes (dropout modules and the float-dropout owners
    of torch are handled as such)."""
    return not (is_dropout_module(module) or _has_float_dropout(module) or isinstance(module, nn.RNNBase))


def _rate_attributes(
    model: nn.Module, example_input: Any = None
) -> dict[str, list[tuple[str, nn.Module, str]]]:
    """Per owner name, the ``(path, owner, attribute)`` of every float rate the owner applies functionally.

    Candidates by name and value (:func:`~lightning_dropout._attr_sites.rate_attribute_candidates`); proven
    by a sentinel probe with ``example_input`` for owners it runs, else by the owner's source."""
    owners = [
        (q, m, attr_sites.rate_attribute_candidates(m)) for q, m in _candidates(model) if _rate_owner(m)
    ]
    owners = [(q, m, names) for q, m, names in owners if names]
    if not owners:
        return {}
    probed = None
    if example_input is not None:
        probed = attr_sites.probe(
            model,
            lambda: _call(model, example_input),
            [(m, n) for _, m, names in owners for n in names],
            [m for _, m, _ in owners],
        )
    found: dict[str, list[tuple[str, nn.Module, str]]] = {}
    for qualname, module, names in owners:
        for name in names:
            if attr_sites.reaches_dropout(module, name, probed):
                path = f"{qualname}.{name}" if qualname else name
                found.setdefault(qualname, []).append((path, module, name))
    return found


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
            picked.extend((path, module, attr) for path, module, attr in owned if rule._selects(path, module))
            if not (is_dropout_module(module) or _has_float_dropout(module)):
                continue
        elif not isinstance(module, rule.replace):
            continue
        if rule.replace is not None and qualname == "":
            continue
        if rule._selects(qualname, module):
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


def _check_rules(rules: Any, call: str) -> None:
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


def resolve(
    model: nn.Module, rules: Sequence[Rule], example_input: Any = None, *, _traced: _Trace | None = None
) -> DropoutPlan:
    """Turn ``rules`` into a :class:`~lightning_dropout.plan.DropoutPlan` for ``model`` (nothing is changed).

    Args:
        model: any ``nn.Module`` (already injected modules are looked through).
        rules: the rules, applied in order; a later rule overrides an earlier one on the same site.
        example_input: optional input (tensor, tuple of positional args, or dict of kwargs); when given, the
            output layer is found by execution order.

    Raises:
        DropoutConfigError: a rule matches nothing (with the closest module names) or a variant cannot
            apply to a selected module.
    """
    if isinstance(rules, Rule):
        rules = [rules]
    _check_rules(rules, "resolve(model, rules)")
    rules = [r if isinstance(r, Rule) else Rule(**r) for r in rules]
    wants_head = any(r.exclude_output_layer for r in rules)
    head = output_layer(model, example_input, _traced=_traced) if wants_head else None
    rates = _rate_attributes(model, example_input) if any(r.replace is not None for r in rules) else {}
    sites: list[Site] = []
    for index, rule in enumerate(rules):
        excluded = {head} if (rule.exclude_output_layer and head is not None) else set()
        picked = _selected(rule, model, excluded, rates)
        new: list[Site] = []
        skipped: list[str] = []
        for qualname, module, attr in picked:
            if rule.replace is None:
                new.extend(_injection_sites(rule, qualname, module))
            else:
                found = _replacement_sites(rule, qualname, module, model, attr)
                if not found and attr is not None and getattr(module, attr) > 0:
                    skipped.append(qualname)
                new.extend(found)
        if not new and skipped:
            raise DropoutConfigError(
                f"rules[{index}] {rule.label()} selects only float rates the model applies functionally "
                f"({skipped[:3]}{' ...' if len(skipped) > 3 else ''}), which take only variant 'standard', but got "
                f"{rule.variant!r}."
            )
        if not new:
            raise _no_match_error(rule, index, model)
        if skipped:
            warnings.warn(
                f"rules[{index}] {rule.label()} leaves {len(skipped)} float rates the model applies functionally "
                f"as they are ({skipped[:3]}{' ...' if len(skipped) > 3 else ''}): they take only variant 'standard'; "
                "add a Rule(replace=True, variant='standard') to set or tune them.",
                UserWarning,
                stacklevel=2,
            )
        if rule.depth_scaling == "linear" and len(new) > 1:
            n = len(new)
            new = [Site(s.target, s.where, s.variant, s.p * i / (n - 1), s.params) for i, s in enumerate(new)]
        sites.extend(new)
    plan = DropoutPlan(sites)
    log.debug("resolved %d rules into %d sites", len(rules), len(plan))
    return plan


# ----------------------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------------------
class _SiteHook:
    """Base of every hook lightning-dropout installs (so undo can find exactly its own)."""

    def __init__(self, key: str, child: str) -> None:
        self.key = key
        self.child = child

    def _fail(self, err: DropoutConfigError) -> DropoutConfigError:
        return DropoutConfigError(f"dropout site {self.key!r}: {err}")


class _OutputHook(_SiteHook):
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        drop = cast(nn.Module, module._modules[self.child])  # the child we registered, never None
        try:
            if isinstance(output, tuple):  # recurrent modules: (sequence, state); the sequence is dropped
                return (drop(output[0]), *output[1:])
            return drop(output)
        except DropoutConfigError as err:
            raise self._fail(err) from None


class _InputHook(_SiteHook):
    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if not args:
            return None
        drop = cast(nn.Module, module._modules[self.child])  # the child we registered, never None
        try:
            return (drop(args[0]), *args[1:])
        except DropoutConfigError as err:
            raise self._fail(err) from None


class _WeightPreHook(_SiteHook):
    """Give the module dropped weights for one call; the parameters themselves are never re-registered."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        drop: WeightDropout = module._modules[self.child]  # type: ignore[assignment]
        _restore_weights(module, drop)
        if not drop.training or drop.p == 0.0:
            return
        for name in drop.weights or ():
            dropped = drop(module._parameters[name])
            if isinstance(module, nn.RNNBase):
                module._flat_weights[module._flat_weights_names.index(name)] = dropped
            else:
                drop.__dict__.setdefault("_stash", {})[name] = module._parameters[name]
                module._parameters[name] = dropped  # type: ignore[assignment]


class _WeightPostHook(_SiteHook):
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        _restore_weights(module, module._modules[self.child])  # type: ignore[arg-type]


def _restore_weights(module: nn.Module, drop: WeightDropout) -> None:
    stash = drop.__dict__.get("_stash") or {}
    for name in drop.weights or ():
        if name in stash:
            module._parameters[name] = stash.pop(name)
        if isinstance(module, nn.RNNBase):
            module._flat_weights[module._flat_weights_names.index(name)] = module._parameters[name]


def _remove_hooks(module: nn.Module, key: str) -> None:
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for hook_id in [i for i, h in hooks.items() if isinstance(h, _SiteHook) and h.key == key]:
            del hooks[hook_id]
            for flags in (
                module._forward_hooks_with_kwargs,
                module._forward_pre_hooks_with_kwargs,
                module._forward_hooks_always_called,
            ):
                flags.pop(hook_id, None)


class _FirstTrainingForward(_SiteHook):
    """One-shot pre-hook on the owner of a ``replace`` site with a non-standard variant: on the owner's first
    training forward, probe it with the real arguments to see whether it calls the variant (see
    :func:`_verify_runs`); then remove itself."""

    def __init__(self, key: str, child: str, eager: bool) -> None:
        super().__init__(key, child)
        self.eager = eager

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return None
        _remove_hooks(module, self.key)  # first: the probe calls the owner again
        variant = module._modules.get(self.child)
        if isinstance(variant, DropoutVariant):
            owner_name = self.key.rpartition(":")[0].rpartition(".")[0]
            _verify_runs(
                module, lambda: module(*args, **kwargs), [(self.key, owner_name, module, variant)], self.eager
            )
        return None


# ----------------------------------------------------------------------------------------------------------
# Applying, undoing, inspecting
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Record:
    site: Site
    original: Any = None  # replaced module; original float (attribute); appended key (Sequential output)


def _records(model: nn.Module) -> dict[str, _Record]:
    return model.__dict__.setdefault(_STATE_ATTR, {})


def _get(model: nn.Module, target: str, site: Site) -> nn.Module:
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


def _float_slot(model: nn.Module, site: Site) -> tuple[nn.Module, str]:
    """``(module, attribute)`` holding the float rate of an attribute site: ``dropout`` of the target module
    (nn.MultiheadAttention, stacked RNNs), or the attribute of a ``"<owner>.<attribute>"`` path."""
    try:
        return model.get_submodule(site.target), "dropout"
    except AttributeError:
        return _get(model, site.target, site), site.target.rpartition(".")[2]


def _check_site(model: nn.Module, site: Site, module: nn.Module) -> None:
    """Refuse sites whose target cannot take them, naming the site."""
    if site.where == "attribute" and _is_rate_path(model, site):
        attr = site.target.rpartition(".")[2]
        value = vars(module).get(attr)
        if not (attr_sites.is_rate_name(attr) and attr_sites.is_rate_value(value)):
            raise DropoutConfigError(
                f"site {site.key!r}: an attribute site on {type(module).__name__} needs a float rate 0 <= p < 1 "
                f"named like {attr_sites.RATE_ATTRIBUTES} (extend with register_rate_attribute), but got "
                f"{attr}={value!r}."
            )
        if site.variant != "standard":
            raise DropoutConfigError(_functional_refusal(site.target, module, attr, site.variant))
    elif site.where == "attribute":
        if not _has_float_dropout(module):
            raise DropoutConfigError(
                f"site {site.key!r}: where='attribute' needs nn.MultiheadAttention or an RNN with "
                f"num_layers > 1, but the target is {type(module).__name__}."
            )
        if site.variant != _float_variant(module):
            raise DropoutConfigError(
                f"site {site.key!r}: the float dropout of {type(module).__name__} takes only "
                f"variant {_float_variant(module)!r}, but got {site.variant!r}."
            )
    elif site.variant == "attention":
        raise DropoutConfigError(
            f"site {site.key!r}: variant 'attention' is applied with where='attribute' on "
            f"nn.MultiheadAttention, but got where={site.where!r}."
        )
    if site.where == "weight" and site.variant != "weight":
        raise DropoutConfigError(
            f"site {site.key!r}: where='weight' takes only variant 'weight', but got {site.variant!r}."
        )
    if site.where == "input" and isinstance(module, nn.Sequential):
        raise DropoutConfigError(
            f"site {site.key!r}: where='input' is not supported on nn.Sequential; target its "
            "first module instead."
        )
    if site.where == "replace" and site.target == "":
        raise DropoutConfigError(f"site {site.key!r}: the root module cannot be replaced.")


def _is_rate_path(model: nn.Module, site: Site) -> bool:
    """Whether an attribute site names ``"<owner>.<attribute>"`` rather than a torch float-dropout module."""
    try:
        model.get_submodule(site.target)
    except AttributeError:
        return True
    return False


def _check_shapes(plan: DropoutPlan, trace: _Trace) -> None:
    for site in plan:
        shape = {"output": trace.out_shapes, "input": trace.in_shapes, "replace": trace.in_shapes}.get(
            site.where, {}
        ).get(site.target)
        if shape is None:
            continue
        reason = build_variant(site.variant, site.p, **site.params).check_input(torch.Size(shape))
        if reason is not None:
            raise DropoutConfigError(
                f"site {site.key!r}: variant {site.variant!r} {reason}, but the site sees shape "
                f"{shape}; choose a variant that fits, or another site."
            )


def _warn_before_batchnorm(model: nn.Module, plan: DropoutPlan, order: list[str]) -> None:
    for site in plan:
        if site.where not in ("output", "input"):
            continue
        if site.where == "input":
            following = site.target
        else:
            inside = [
                i
                for i, n in enumerate(order)
                if n == site.target or n.startswith(f"{site.target}.") or site.target == ""
            ]
            if not inside or inside[-1] + 1 >= len(order):
                continue
            following = order[inside[-1] + 1]
        if isinstance(model.get_submodule(following), _BatchNorm):
            warnings.warn(
                f"dropout site {site.key!r} feeds the BatchNorm {following!r}: dropout before BatchNorm shifts the "
                "variance between training and inference (Li et al., CVPR 2019); prefer a site after the "
                "normalization.",
                UserWarning,
                stacklevel=3,
            )


def _attach(model: nn.Module, site: Site) -> _Record:
    module = _get(model, site.target, site)
    _check_site(model, site, module)
    if site.where == "attribute":
        owner, attr = _float_slot(model, site)
        record = _Record(site, getattr(owner, attr))
        setattr(owner, attr, site.p)
        return record
    params = _complete_params(site.variant, site.where, module, site.params)
    drop = build_variant(site.variant, site.p, **params)
    if site.where == "replace":
        parent_name, _, child = site.target.rpartition(".")
        parent = model.get_submodule(parent_name)
        record = _Record(site, parent._modules[child])
        setattr(parent, child, drop)
        return record
    if site.where == "output" and isinstance(module, nn.Sequential):
        key = str(len(module))
        if key in module._modules:
            raise DropoutConfigError(
                f"site {site.key!r}: nn.Sequential {site.target!r} already has a child {key!r}."
            )
        module.add_module(key, drop)
        return _Record(site, key)
    child = _CHILD_FOR[site.where]
    if child in module._modules:
        raise DropoutConfigError(
            f"site {site.key!r}: {site.target!r} already has a child {child!r}; undo first."
        )
    module.add_module(child, drop)
    if site.where == "output":
        module.register_forward_hook(_OutputHook(site.key, child))
    elif site.where == "input":
        module.register_forward_pre_hook(_InputHook(site.key, child))
    else:
        module.register_forward_pre_hook(_WeightPreHook(site.key, child))
        module.register_forward_hook(_WeightPostHook(site.key, child), always_call=True)
    return _Record(site)


def _detach(model: nn.Module, record: _Record) -> None:
    site = record.site
    if site.where == "attribute":
        owner, attr = _float_slot(model, site)
        setattr(owner, attr, record.original)
        return
    module = model.get_submodule(site.target)
    if site.where == "replace":
        parent_name, _, child = site.target.rpartition(".")
        parent = model.get_submodule(parent_name)
        _remove_hooks(parent, site.key)
        setattr(parent, child, record.original)
    elif isinstance(module, nn.Sequential) and site.where == "output":
        del module._modules[record.original]  # by key: `del seq[i]` would renumber named children
    else:
        if site.where == "weight":
            _restore_weights(module, module._modules[WEIGHT_CHILD])  # type: ignore[arg-type]
        _remove_hooks(module, site.key)
        del module._modules[_CHILD_FOR[site.where]]


def apply_plan(
    model: nn.Module,
    plan: DropoutPlan,
    example_input: Any = None,
    *,
    eager: bool = False,
    _traced: _Trace | None = None,
) -> DropoutPlan:
    """Apply ``plan`` to ``model`` in place; return the plan now in effect (see :func:`applied_plan`).

    Sites already applied identically are left alone (applying a plan twice changes nothing); a site applied
    with other settings is re-applied with the new ones. With ``example_input``, each site is first checked
    against the shape it will see, and the BatchNorm warning follows execution order.

    A ``replace`` site with a variant other than ``standard`` must run: its owner must call the module. This
    is checked by a training-mode probe with ``example_input`` now, or else on the owner's first training
    forward. An owner that passes the module's ``.p`` to a fused kernel instead (timm ``fused_attn``,
    Hugging Face SDPA) is refused in one line; with ``eager=True`` it is switched to its eager path first
    (timm ``fused_attn = False``, Hugging Face ``config._attn_implementation = "eager"``; :func:`undo`
    restores it), and refused only if the module still does not run.
    """
    if not isinstance(plan, DropoutPlan):
        raise DropoutConfigError(f"`plan` must be a DropoutPlan, but got {type(plan).__name__}.")
    records = _records(model)
    todo = [s for s in plan if not (s.key in records and records[s.key].site == s)]
    if not todo:
        return applied_plan(model)
    trace = _traced if _traced is not None or example_input is None else _trace(model, example_input)
    pending = DropoutPlan(todo)
    if trace is not None:
        _check_shapes(pending, trace)
    for site in pending:  # validate every site before touching the model
        _check_site(model, site, _get(model, site.target, site))
    _warn_before_batchnorm(model, pending, trace.order if trace else _definition_order(model))
    previous: dict[str, _Record] = {}
    order = list(records)
    for site in pending:
        if site.key in records:
            previous[site.key] = records.pop(site.key)
            _detach(model, previous[site.key])
        records[site.key] = _attach(model, site)
    try:
        _check_runs(
            model,
            [s for s in pending if s.where == "replace" and s.variant != "standard"],
            example_input,
            eager,
        )
    except DropoutConfigError:
        for site in reversed(list(pending)):  # leave the model as it was
            _detach(model, records.pop(site.key))
            if site.key in previous:
                records[site.key] = _attach(model, previous[site.key].site)
        kept = {key: records[key] for key in order if key in records}
        records.clear()
        records.update(kept)
        raise
    log.debug("applied %d dropout sites to %s", len(pending), type(model).__name__)
    return applied_plan(model)


def _check_runs(model: nn.Module, sites: list[Site], example_input: Any, eager: bool) -> None:
    """Verify that the variants of non-standard ``replace`` sites run: now with ``example_input``, else on
    each owner's first training forward."""
    entries = []
    for site in sites:
        owner_name, _, child = site.target.rpartition(".")
        owner = model.get_submodule(owner_name)
        if example_input is None:
            owner.register_forward_pre_hook(_FirstTrainingForward(site.key, child, eager), with_kwargs=True)
        else:
            entries.append((site.key, owner_name, owner, cast(DropoutVariant, owner._modules[child])))
    if entries:
        _verify_runs(model, lambda: _call(model, example_input), entries, eager)


_EAGER_HINT = (
    "keep variant 'standard' there (or exclude the site), or switch the owner to its eager "
    'path (timm: `fused_attn = False`; Hugging Face: `attn_implementation="eager"`), which eager=True does'
)


def _verify_runs(
    root: nn.Module,
    run: Callable[[], Any],
    entries: list[tuple[str, str, nn.Module, DropoutVariant]],
    eager: bool,
) -> None:
    """Probe ``run()`` (a forward of ``root``) in training mode and refuse, in one line, every variant whose
    owner ran without calling it: it reads the module's ``.p`` into a fused kernel, or holds the rate elsewhere;
    either way the variant would act nowhere. With ``eager``, those owners are first switched to their eager
    path, and refused only if the variant still does not run."""
    rates = [(v, "p") for _, _, _, v in entries if "p" in vars(v)]
    watch = [m for _, _, owner, v in entries for m in (owner, v)]
    probed = attr_sites.probe(root, run, rates, watch)
    if probed is None:
        return
    unused = []
    for key, owner_name, owner, variant in entries:
        if id(owner) not in probed.called or id(variant) in probed.called:
            continue
        kernel = probed.reached.get((id(variant), "p"))
        why = (
            f"reads the module's `.p` into {kernel}() instead of calling the module"
            if kernel is not None
            else "ran in training mode without calling the module (a fused path may hold the rate elsewhere)"
        )
        unused.append(
            (
                f"site {key!r}: variant {variant.variant_name!r} would never run: "
                f"{type(owner).__name__} {owner_name!r} {why}",
                owner,
                variant,
            )
        )
    if not unused:
        return
    switches = {id(owner): attr_sites.eager_switches(owner) for _, owner, _ in unused}  # before any flips
    for head, owner, _ in unused:
        if not eager or not switches[id(owner)]:
            hint = (
                f"{_EAGER_HINT} for you"
                if switches[id(owner)]
                else "only variant 'standard' can act there (or exclude the site)"
            )
            raise DropoutConfigError(f"{head}; {hint}.")
    switched: list[nn.Module] = []
    try:
        for _, owner, _ in unused:
            if owner not in switched:
                attr_sites.apply_switches(owner, switches[id(owner)])
                switched.append(owner)
        again = attr_sites.probe(root, run, [], [v for *_, v in unused])
        for head, owner, variant in unused:
            done = ", ".join(s.describe() for s in switches[id(owner)])
            if again is not None and id(variant) not in again.called:
                raise DropoutConfigError(
                    f"{head}, even after switching it to its eager path ({done}); only variant 'standard' can act "
                    "there (or exclude the site)."
                )
            log.info(
                "%s: switched the owner to its eager path (%s), so the variant runs", head.split(":")[0], done
            )
    except DropoutConfigError:
        for owner in reversed(switched):
            attr_sites.restore_switches(owner)
        raise


def check_plan(model: nn.Module, plan: DropoutPlan, example_input: Any = None) -> None:
    """Raise the :class:`DropoutConfigError` that ``apply_plan(model, plan, example_input)`` would raise (a
    site that does not exist, a variant that does not fit the module or the shape it sees); ``model`` is left
    unchanged."""
    if example_input is not None:
        _check_shapes(plan, _trace(model, example_input))
    for site in plan:
        _check_site(model, site, _get(model, site.target, site))


def inject(
    model: nn.Module,
    rules: Sequence[Rule] | Rule | None = None,
    plan: DropoutPlan | None = None,
    example_input: Any = None,
    *,
    eager: bool = False,
) -> DropoutPlan:
    """Resolve ``rules`` (or take ``plan``) and apply it to ``model`` in place; returns the applied plan.

    Exactly one of ``rules`` and ``plan`` must be given. ``eager=True`` lets a non-standard variant replace a
    dropout module that a fused attention kernel bypasses, by switching its owner to the eager path (see
    :func:`apply_plan`).
    """
    if (rules is None) == (plan is None):
        raise DropoutConfigError(
            "give exactly one of `rules` and `plan`, but got "
            f"rules={'set' if rules is not None else None}, plan={'set' if plan is not None else None}."
        )
    if isinstance(rules, DropoutPlan):
        raise DropoutConfigError(
            f"`inject(model, rules)` takes Rule objects as `rules`, but got a DropoutPlan ({len(rules)} sites); "
            "pass a plan by keyword: inject(model, plan=...)."
        )
    if rules is not None:
        _check_rules(rules, "inject(model, rules)")
        traced = _trace(model, example_input) if example_input is not None else None  # one forward for both
        plan = resolve(model, [rules] if isinstance(rules, Rule) else rules, example_input, _traced=traced)
        return apply_plan(model, plan, example_input, eager=eager, _traced=traced)
    assert plan is not None
    return apply_plan(model, plan, example_input, eager=eager)


def undo(model: nn.Module) -> None:
    """Remove every site lightning-dropout applied to ``model``, restoring the original modules exactly."""
    records = model.__dict__.get(_STATE_ATTR, {})
    for key in reversed(list(records)):
        _detach(model, records.pop(key))
    model.__dict__.pop(_STATE_ATTR, None)
    attr_sites.restore_switches(model)


def applied_plan(model: nn.Module) -> DropoutPlan:
    """The plan currently applied to ``model`` (empty when nothing is)."""
    return DropoutPlan(r.site for r in model.__dict__.get(_STATE_ATTR, {}).values())


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
    out = []
    for record in model.__dict__.get(_STATE_ATTR, {}).values():
        site = record.site
        attr = "dropout"
        if site.where == "attribute":
            owner, attr = _float_slot(model, site)
            module = None
        else:
            owner = model.get_submodule(site.target)
            if site.where == "replace":
                module = owner
            elif isinstance(owner, nn.Sequential) and site.where == "output":
                module = owner._modules[record.original]
            else:
                module = owner._modules[_CHILD_FOR[site.where]]
        out.append(SiteHandle(site, module, owner, attr))  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class SiteInfo:
    """One row of :func:`describe`."""

    key: str
    target: str
    module_type: str
    where: str
    variant: str
    p: float
    params: dict[str, Any]
    shape: tuple[int, ...] | None


def describe(model: nn.Module, example_input: Any = None) -> list[SiteInfo]:
    """List every applied site: name, module type, variant, current rate, and the shape the site sees when
    ``example_input`` is given. ``print(format_sites(describe(model)))`` shows it as a table."""
    trace = _trace(model, example_input) if example_input is not None else None
    rows = []
    for handle in site_handles(model):
        site = handle.site
        shape = None
        if trace is not None:
            shapes = trace.in_shapes if site.where in ("input", "replace") else trace.out_shapes
            shape = shapes.get(site.target)
        module_type = type(
            handle.owner if site.where != "replace" else model.__dict__[_STATE_ATTR][site.key].original
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
    """A fixed-width text table of :func:`describe` rows."""
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
