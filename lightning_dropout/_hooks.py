"""The hooks lightning-dropout installs on a model's modules, and the training-mode probe that checks a
``replace`` site's variant actually runs (torch only)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from torch import nn

from lightning_dropout import _attr_sites as attr_sites
from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.variants import DropoutVariant, WeightDropout

__all__ = [
    "FirstTrainingForward",
    "InputHook",
    "OutputHook",
    "WeightPostHook",
    "WeightPreHook",
    "remove_hooks",
    "restore_weights",
    "verify_runs",
]

log = logging.getLogger(__name__)


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


class OutputHook(_SiteHook):
    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        drop = cast(nn.Module, module._modules[self.child])  # the child we registered, never None
        try:
            if isinstance(output, tuple):  # recurrent modules: (sequence, state); the sequence is dropped
                return (drop(output[0]), *output[1:])
            return drop(output)
        except DropoutConfigError as err:
            raise self._fail(err) from None


class InputHook(_SiteHook):
    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args:
            return None
        drop = cast(nn.Module, module._modules[self.child])  # the child we registered, never None
        try:
            return (drop(args[0]), *args[1:])
        except DropoutConfigError as err:
            raise self._fail(err) from None


class WeightPreHook(_SiteHook):
    """Give the module dropped weights for one call; the parameters themselves are never re-registered."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        drop: WeightDropout = module._modules[self.child]  # type: ignore[assignment]
        restore_weights(module, drop)
        if not drop.training or drop.p == 0.0:
            return
        for name in drop.weights or ():
            dropped = drop(module._parameters[name])
            if isinstance(module, nn.RNNBase):
                module._flat_weights[module._flat_weights_names.index(name)] = dropped
            else:
                drop.__dict__.setdefault("_stash", {})[name] = module._parameters[name]
                module._parameters[name] = dropped


class WeightPostHook(_SiteHook):
    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        restore_weights(module, module._modules[self.child])  # type: ignore[arg-type]


def restore_weights(module: nn.Module, drop: WeightDropout) -> None:
    stash = drop.__dict__.get("_stash") or {}
    for name in drop.weights or ():
        if name in stash:
            module._parameters[name] = stash.pop(name)
        if isinstance(module, nn.RNNBase):
            module._flat_weights[module._flat_weights_names.index(name)] = module._parameters[name]


def remove_hooks(module: nn.Module, key: str) -> None:
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for hook_id in [i for i, h in hooks.items() if isinstance(h, _SiteHook) and h.key == key]:
            del hooks[hook_id]
            for flags in (
                module._forward_hooks_with_kwargs,
                module._forward_pre_hooks_with_kwargs,
                module._forward_hooks_always_called,
            ):
                flags.pop(hook_id, None)


class FirstTrainingForward(_SiteHook):
    """One-shot pre-hook on the owner of a ``replace`` site with a non-standard variant: on the owner's first
    training forward, probe it with the real arguments to see whether it calls the variant (see
    :func:`verify_runs`); then remove itself."""

    def __init__(self, key: str, child: str, eager: bool) -> None:
        super().__init__(key, child)
        self.eager = eager

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:
            return None
        remove_hooks(module, self.key)  # first: the probe calls the owner again
        variant = module._modules.get(self.child)
        if isinstance(variant, DropoutVariant):
            owner_name = self.key.rpartition(":")[0].rpartition(".")[0]
            try:
                verify_runs(
                    module,
                    lambda: module(*args, **kwargs),
                    [(self.key, owner_name, module, variant)],
                    self.eager,
                )
            except DropoutConfigError as err:
                raise DropoutConfigError(
                    f"{str(err).rstrip('.')}; given an example input (`example_input`, the LightningModule's "
                    "`example_input_array`) this is found when injecting, where a replace=True rule leaves the "
                    "site as it is."
                ) from None
        return None


def verify_runs(
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
    refused = [(h, o, v) for h, o, v in unused if not eager or not switches[id(o)]]
    if refused:
        head, owner, variant = refused[0]
        helps = id(variant) in attr_sites.eager_calls(root, run, [(owner, variant)])
        hint = attr_sites.bypass_hint(owner, helps)
        if hint.startswith("or "):
            hint = f"keep variant 'standard' there (or exclude the site), {hint}"
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
                found = attr_sites.transformers_major(owner)
                why = f" ({attr_sites.bypass_hint(owner, False).partition(': ')[2]})" if found else ""
                raise DropoutConfigError(
                    f"{head}, even after switching it to its eager path ({done}); only variant 'standard' can act "
                    f"there (or exclude the site){why}."
                )
            log.info(
                "%s: switched the owner to its eager path (%s), so the variant runs", head.split(":")[0], done
            )
    except DropoutConfigError:
        for owner in reversed(switched):
            attr_sites.restore_switches(owner)
        raise
