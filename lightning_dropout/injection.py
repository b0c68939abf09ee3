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

import logging
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_dropout import _attr_sites as attr_sites
from lightning_dropout._hooks import (
    FirstTrainingForward,
    InputHook,
    OutputHook,
    WeightPostHook,
    WeightPreHook,
    remove_hooks,
    restore_weights,
    verify_runs,
)
from lightning_dropout._resolve import (
    check_rules,
    complete_params,
    float_variant,
    functional_refusal,
    resolve,
)
from lightning_dropout._state import (
    CHILD_FOR,
    STATE_ATTR,
    WEIGHT_CHILD,
    SiteRecord,
    float_slot,
    site_module,
    site_records,
)
from lightning_dropout._trace import Trace, call_model, definition_order, output_layer, trace_input
from lightning_dropout.errors import DropoutConfigError, check_instance
from lightning_dropout.handles import (
    SiteHandle,
    SiteInfo,
    describe,
    existing_dropout,
    format_sites,
    regularization,
    site_handles,
)
from lightning_dropout.plan import DropoutPlan, Site
from lightning_dropout.rules import Rule, existing_rate, has_float_dropout, is_dropout_module
from lightning_dropout.variants import DropoutVariant, build_variant

# The engine is split by concern (see docs/architecture.md): rules.py (Rule, what counts as dropout),
# _trace.py (tracing an example input), _resolve.py (rules -> plan), _hooks.py (the hooks), _state.py (the
# records of what was applied), handles.py (inspection); this module applies and undoes plans and re-exports
# the public names of the others, so `from lightning_dropout.injection import ...` keeps working.
__all__ = [
    "Rule",
    "SiteHandle",
    "SiteInfo",
    "applied_plan",
    "apply_plan",
    "describe",
    "existing_dropout",
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
            raise DropoutConfigError(functional_refusal(site.target, module, attr, site.variant))
    elif site.where == "attribute":
        if not has_float_dropout(module):
            raise DropoutConfigError(
                f"site {site.key!r}: where='attribute' needs nn.MultiheadAttention or an RNN with "
                f"num_layers > 1, but the target is {type(module).__name__}."
            )
        if site.variant != float_variant(module):
            raise DropoutConfigError(
                f"site {site.key!r}: the float dropout of {type(module).__name__} takes only "
                f"variant {float_variant(module)!r}, but got {site.variant!r}."
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


def _build(model: nn.Module, site: Site, trace: Trace | None) -> DropoutVariant | None:
    """The one module ``site`` keeps (``None`` for an attribute site, which sets a float), its parameters
    completed from its target, checked against the shape the site sees in ``trace``."""
    module = site_module(model, site.target, site)
    _check_site(model, site, module)
    if site.where == "attribute":
        return None
    drop = build_variant(
        site.variant, site.p, **complete_params(site.variant, site.where, module, site.params)
    )
    shape = None
    if trace is not None:
        shapes = {"output": trace.out_shapes, "input": trace.in_shapes, "replace": trace.in_shapes}
        shape = shapes.get(site.where, {}).get(site.target)
    reason = drop.check_input(torch.Size(shape)) if shape is not None else None
    if reason is not None:
        raise DropoutConfigError(
            f"site {site.key!r}: variant {site.variant!r} {reason}, but the site sees shape "
            f"{shape}; choose a variant that fits, or another site."
        )
    return drop


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


def _attach(model: nn.Module, site: Site, drop: DropoutVariant | None) -> SiteRecord:
    """Put ``site`` in place with ``drop``, the module :func:`_build` made for it."""
    if site.where == "attribute":
        owner, attr = float_slot(model, site)
        record = SiteRecord(site, getattr(owner, attr))
        setattr(owner, attr, site.p)
        return record
    assert drop is not None
    module = model.get_submodule(site.target)
    if site.where == "replace":
        parent_name, _, child = site.target.rpartition(".")
        parent = model.get_submodule(parent_name)
        record = SiteRecord(site, parent._modules[child])
        setattr(parent, child, drop)
        return record
    if site.where == "output" and isinstance(module, nn.Sequential):
        key = str(len(module))
        if key in module._modules:
            raise DropoutConfigError(
                f"site {site.key!r}: nn.Sequential {site.target!r} already has a child {key!r}."
            )
        module.add_module(key, drop)
        return SiteRecord(site, key)
    child = CHILD_FOR[site.where]
    if child in module._modules:
        raise DropoutConfigError(
            f"site {site.key!r}: {site.target!r} already has a child {child!r}; undo first."
        )
    module.add_module(child, drop)
    if site.where == "output":
        module.register_forward_hook(OutputHook(site.key, child))
    elif site.where == "input":
        module.register_forward_pre_hook(InputHook(site.key, child))
    else:
        module.register_forward_pre_hook(WeightPreHook(site.key, child))
        module.register_forward_hook(WeightPostHook(site.key, child), always_call=True)
    return SiteRecord(site)


def _detach(model: nn.Module, record: SiteRecord) -> None:
    site = record.site
    if site.where == "attribute":
        owner, attr = float_slot(model, site)
        setattr(owner, attr, record.original)
        return
    module = model.get_submodule(site.target)
    if site.where == "replace":
        parent_name, _, child = site.target.rpartition(".")
        parent = model.get_submodule(parent_name)
        remove_hooks(parent, site.key)
        setattr(parent, child, record.original)
    elif isinstance(module, nn.Sequential) and site.where == "output":
        del module._modules[record.original]  # by key: `del seq[i]` would renumber named children
    else:
        if site.where == "weight":
            restore_weights(module, module._modules[WEIGHT_CHILD])  # type: ignore[arg-type]
        remove_hooks(module, site.key)
        del module._modules[CHILD_FOR[site.where]]


def apply_plan(
    model: nn.Module,
    plan: DropoutPlan,
    example_input: Any = None,
    *,
    eager: bool = False,
    _traced: Trace | None = None,
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
    check_instance(model, nn.Module, "model", "apply_plan(model, plan)", "an nn.Module")
    if not isinstance(plan, DropoutPlan):
        raise DropoutConfigError(f"`plan` must be a DropoutPlan, but got {type(plan).__name__}.")
    records = site_records(model)
    todo = [s for s in plan if not (s.key in records and records[s.key].site == s)]
    if not todo:
        return applied_plan(model)
    trace = _traced if _traced is not None or example_input is None else trace_input(model, example_input)
    pending = DropoutPlan(todo)
    built = {site.key: _build(model, site, trace) for site in pending}  # every site checked before any change
    _warn_before_batchnorm(model, pending, trace.order if trace else definition_order(model))
    previous: dict[str, SiteRecord] = {}
    order = list(records)
    for site in pending:
        if site.key in records:
            previous[site.key] = records.pop(site.key)
            _detach(model, previous[site.key])
        records[site.key] = _attach(model, site, built[site.key])
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
                old = previous[site.key].site
                records[site.key] = _attach(model, old, _build(model, old, None))
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
            owner.register_forward_pre_hook(FirstTrainingForward(site.key, child, eager), with_kwargs=True)
        else:
            entries.append((site.key, owner_name, owner, cast(DropoutVariant, owner._modules[child])))
    if entries:
        verify_runs(model, lambda: call_model(model, example_input), entries, eager)


def check_plan(model: nn.Module, plan: DropoutPlan, example_input: Any = None) -> None:
    """Raise the :class:`DropoutConfigError` that ``apply_plan(model, plan, example_input)`` would raise (a
    site that does not exist, a variant that does not fit the module or the shape it sees); ``model`` is left
    unchanged."""
    trace = trace_input(model, example_input) if example_input is not None else None
    for site in plan:
        _build(model, site, trace)


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
    :func:`apply_plan`). A ``replace=True`` rule leaves the sites where its variant cannot act as they are,
    with one warning (``strict=True`` on the rule refuses them; see :func:`resolve`).
    """
    check_instance(model, nn.Module, "model", "inject(model, rules)", "an nn.Module")
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
        check_rules(rules, "inject(model, rules)")
        traced = (
            trace_input(model, example_input) if example_input is not None else None
        )  # one forward for both
        plan = resolve(
            model, [rules] if isinstance(rules, Rule) else rules, example_input, eager=eager, _traced=traced
        )
        return apply_plan(model, plan, example_input, eager=eager, _traced=traced)
    assert plan is not None
    return apply_plan(model, plan, example_input, eager=eager)


def undo(model: nn.Module) -> None:
    """Remove every site lightning-dropout applied to ``model``, restoring the original modules exactly."""
    check_instance(model, nn.Module, "model", "undo(model)", "an nn.Module")
    records = model.__dict__.get(STATE_ATTR, {})
    for key in reversed(list(records)):
        _detach(model, records.pop(key))
    model.__dict__.pop(STATE_ATTR, None)
    attr_sites.restore_switches(model)


def applied_plan(model: nn.Module) -> DropoutPlan:
    """The plan currently applied to ``model`` (empty when nothing is)."""
    check_instance(model, nn.Module, "model", "applied_plan(model)", "an nn.Module")
    return DropoutPlan(r.site for r in model.__dict__.get(STATE_ATTR, {}).values())
