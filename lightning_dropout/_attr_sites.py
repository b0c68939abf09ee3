"""What a forward pass really applies: float rates used functionally, and dropout modules a kernel bypasses.

Two patterns of the big model libraries hide dropout from a module walk (torch only):

* **Rate attributes.** Hugging Face BART (mBART, Marian, Pegasus, Whisper, ...) and T5 attention keep their
  rates as floats (``self.dropout``, ``self.activation_dropout``) and call
  ``nn.functional.dropout(x, p=self.dropout, training=self.training)``; timm heads call
  ``F.dropout(x, p=self.drop_rate, ...)``. :func:`rate_attributes` finds such floats: a name in
  :data:`RATE_ATTRIBUTES` (extend it with :func:`register_rate_attribute`), a value with ``0 <= p < 1``, and
  proof that the value reaches a dropout kernel (see :func:`reaches_dropout`).
* **Bypassed modules.** timm's ``Attention`` (``fused_attn``) and Hugging Face attention pass
  ``dropout_p=self.attn_drop.p`` to ``F.scaled_dot_product_attention`` and never call the dropout module.
  :func:`probe` runs a training-mode forward that records which modules ran and which rates reached a kernel,
  so the engine can tell a replaced module that never runs from one that does.

Proof that a rate is dropout, the guard against false positives (``self.keep_prob``, ``self.mask_prob`` used
as a threshold, a config value read in ``__init__`` only):

1. with an example input (the engine's ``example_input``): every candidate is set to a distinct sentinel rate
   for one training-mode forward (no gradients; random state, buffers and train/eval flags restored after);
   a candidate is a rate attribute iff its sentinel arrives as an argument of a dropout or attention kernel
   (``nn.functional.dropout*``, ``scaled_dot_product_attention``, ...), seen through a
   :class:`~torch.overrides.TorchFunctionMode`, whatever the import style of the caller;
2. otherwise, and for owners the example forward never ran: the source of the owner's class (its own methods
   other than ``__init__``) passes ``self.<name>`` into a call of a function whose name contains ``dropout``
   or ``attention``/``attn``, or as a keyword ``p``, ``dropout``, ``dropout_p`` or ``*drop*``.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import functools
import inspect
import logging
import sys
import textwrap
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_dropout.errors import DropoutConfigError

__all__ = [
    "RATE_ATTRIBUTES",
    "EagerSwitch",
    "Probe",
    "bypass_hint",
    "eager_calls",
    "eager_switches",
    "probe",
    "rate_attribute_candidates",
    "reaches_dropout",
    "register_rate_attribute",
    "static_bypass",
]

log = logging.getLogger(__name__)

RATE_ATTRIBUTES: list[str] = ["dropout", "*_dropout", "drop_rate", "*_drop_rate", "*_prob"]
"""Glob patterns of attribute names that may hold a dropout rate applied functionally."""

_NEVER = (
    "keep",
    "_",
)  # name prefixes that are never a drop rate: keep_prob is 1 - p; privates are ours to skip
_KERNEL_WORDS = ("dropout", "attention", "attn")
_RATE_KEYWORDS = ("p", "dropout", "dropout_p")
SWITCH_STATE = "_lightning_dropout_switches"


def register_rate_attribute(*patterns: str) -> None:
    """Also treat attributes whose names match these globs (``"attn_pdrop"``, ``"*_pdrop"``) as candidate
    rates; a candidate still needs proof that it reaches a dropout kernel."""
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise DropoutConfigError(
                f"`pattern` must be a non-empty glob string, but got pattern={pattern!r}."
            )
        if pattern not in RATE_ATTRIBUTES:
            RATE_ATTRIBUTES.append(pattern)


def is_rate_name(name: str) -> bool:
    """Whether ``name`` matches :data:`RATE_ATTRIBUTES` (and is not ``keep*`` or private)."""
    if name.startswith(_NEVER):
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RATE_ATTRIBUTES)


def is_rate_value(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) < 1.0


def rate_attribute_candidates(module: nn.Module) -> list[str]:
    """Names of the plain attributes of ``module`` that look like a rate: a name in :data:`RATE_ATTRIBUTES`,
    a number with ``0 <= p < 1``. Parameters, buffers and submodules are never candidates."""
    return [name for name, value in vars(module).items() if is_rate_name(name) and is_rate_value(value)]


# ----------------------------------------------------------------------------------------------------------
# Static proof: the class's own code passes self.<name> into a dropout or attention call
# ----------------------------------------------------------------------------------------------------------
def _callee(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _reads(node: ast.AST, attr: str) -> bool:
    return any(
        isinstance(n, ast.Attribute)
        and n.attr == attr
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
        and isinstance(n.ctx, ast.Load)
        for n in ast.walk(node)
    )


@functools.lru_cache(maxsize=512)
def _class_methods(cls: type) -> tuple[ast.AST, ...]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return ()
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    return tuple(
        n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name != "__init__"
    )


@functools.lru_cache(maxsize=1024)
def _static_proof(cls: Any, attr: str) -> bool:
    for klass in cls.__mro__:
        if klass is nn.Module or klass.__module__.startswith("torch."):
            break
        for method in _class_methods(klass):
            for call in (n for n in ast.walk(method) if isinstance(n, ast.Call)):
                callee = _callee(call).lower()
                if any(word in callee for word in _KERNEL_WORDS) and any(
                    _reads(a, attr) for a in [*call.args, *call.keywords]
                ):
                    return True
                for kw in call.keywords:
                    named = kw.arg is not None and (kw.arg in _RATE_KEYWORDS or "drop" in kw.arg)
                    if named and _reads(kw.value, attr):
                        return True
    return False


def _self_attr(node: ast.AST, attr: str) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == attr
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


@functools.lru_cache(maxsize=1024)
def static_bypass(cls: Any, child: str) -> bool:
    """Whether the source of ``cls`` (its own methods and its bases', ``__init__`` aside) reads
    ``self.<child>.p`` and never calls ``self.<child>(...)``: the module is a rate holder for a kernel
    (transformers 5's attention passes ``dropout=self.dropout.p``), so a module put in its place never runs."""
    reads = calls = False
    for klass in cls.__mro__:
        if klass is nn.Module or klass.__module__.startswith("torch."):
            break
        for method in _class_methods(klass):
            for node in ast.walk(method):
                reads = reads or (
                    isinstance(node, ast.Attribute) and node.attr == "p" and _self_attr(node.value, child)
                )
                calls = calls or (isinstance(node, ast.Call) and _self_attr(node.func, child))
    return reads and not calls


def reaches_dropout(module: nn.Module, attr: str, probed: Probe | None = None) -> bool:
    """Whether ``module.<attr>`` is a rate the module applies: by the probe when it ran the module, else by
    the source of its class (see the module docstring)."""
    if probed is not None and id(module) in probed.called:
        return (id(module), attr) in probed.reached
    return _static_proof(cast(Hashable, type(module)), attr)


# ----------------------------------------------------------------------------------------------------------
# Dynamic proof: a training-mode forward with sentinel rates, watching the kernels
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """What one probing forward saw: ids of the watched modules that ran, and which (object id, attribute)
    rates reached which kernel."""

    called: set[int] = field(default_factory=set)
    reached: dict[tuple[int, str], str] = field(default_factory=dict)


class _KernelWatch(TorchFunctionMode):
    def __init__(self, sentinels: dict[float, tuple[int, str]], probed: Probe) -> None:
        super().__init__()
        self.sentinels = sentinels
        self.probed = probed

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if any(word in name.lower() for word in _KERNEL_WORDS):
            for value in [*args, *kwargs.values()]:
                if isinstance(value, float) and value in self.sentinels:
                    self.probed.reached.setdefault(self.sentinels[value], name)
        return func(*args, **kwargs)


def _sentinel(i: int) -> float:
    return (
        0.0123456789 + i * 1.0e-6
    )  # distinct, nonzero (so `if self.drop_rate:` branches run), never a real rate


@contextlib.contextmanager
def _isolated(root: nn.Module) -> Iterator[None]:
    """Training mode, no gradients; train/eval flags, buffers and the random state restored afterwards."""
    flags = {m: m.training for m in root.modules()}
    buffers = [(b, b.detach().clone()) for b in root.buffers()]
    tensors = [*root.parameters(), *root.buffers()]
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            root.train()
            yield
    finally:
        for mod, flag in flags.items():
            mod.training = flag
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)


def probe(
    root: nn.Module,
    run: Callable[[], Any],
    rates: Iterable[tuple[Any, str]] = (),
    watch: Iterable[nn.Module] = (),
) -> Probe | None:
    """Run ``run()`` (a forward of ``root``) once in training mode, with every ``(object, attribute)`` of
    ``rates`` set to a distinct sentinel rate, recording which modules of ``watch`` ran and which rates reached
    a dropout or attention kernel. Nothing of ``root`` changes. ``None`` when the forward fails (logged)."""
    probed = Probe()
    slots = list(dict.fromkeys((id(obj), attr) for obj, attr in rates))
    objects = {id(obj): obj for obj, _ in rates}
    originals = {slot: vars(objects[slot[0]])[slot[1]] for slot in slots}
    sentinels = {_sentinel(i): slot for i, slot in enumerate(slots)}
    handles = [
        m.register_forward_pre_hook(lambda mod, args: probed.called.add(id(mod)))
        for m in dict.fromkeys(watch)
    ]
    try:
        for value, (oid, attr) in sentinels.items():
            vars(objects[oid])[attr] = value
        with _isolated(root), _KernelWatch(sentinels, probed):
            run()
    except DropoutConfigError:  # a site's own check, run by its hook within this forward: its refusal stands
        raise
    except Exception as err:  # the user's forward may need more than we know (labels, a cache...)
        log.warning(
            "could not probe %s in training mode (%s: %s)", type(root).__name__, type(err).__name__, err
        )
        return None
    finally:
        for handle in handles:
            handle.remove()
        for (oid, attr), value in originals.items():
            vars(objects[oid])[attr] = value
    return probed


# ----------------------------------------------------------------------------------------------------------
# Eager paths: the switches that make an attention module call its dropout module again
# ----------------------------------------------------------------------------------------------------------
@dataclass
class EagerSwitch:
    """One attribute set to select a module's eager attention path, and the value it had."""

    obj: Any
    attr: str
    value: Any
    original: Any

    def describe(self) -> str:
        return f"{'config.' if self.obj is not None and not isinstance(self.obj, nn.Module) else ''}{self.attr} = {self.value!r}"


def eager_switches(owner: nn.Module) -> list[EagerSwitch]:
    """The switches to ``owner``'s eager path that lightning-dropout knows: timm's ``fused_attn = False`` and
    Hugging Face's ``config._attn_implementation = "eager"`` (shared by the model's modules)."""
    out = []
    if getattr(owner, "fused_attn", None) is True:
        out.append(EagerSwitch(owner, "fused_attn", False, True))
    config = getattr(owner, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if config is not None and isinstance(current, str) and current != "eager":
        out.append(EagerSwitch(config, "_attn_implementation", "eager", current))
    return out


def apply_switches(owner: nn.Module, switches: list[EagerSwitch]) -> None:
    """Flip ``switches`` and record them on ``owner`` so :func:`restore_switches` undoes them."""
    for switch in switches:
        setattr(switch.obj, switch.attr, switch.value)
    owner.__dict__.setdefault(SWITCH_STATE, []).extend(switches)


def restore_switches(root: nn.Module) -> None:
    """Undo every eager switch recorded on ``root``'s modules, last first."""
    for module in reversed(list(root.modules())):
        for switch in reversed(module.__dict__.pop(SWITCH_STATE, [])):
            setattr(switch.obj, switch.attr, switch.original)


@contextlib.contextmanager
def _switched(owners: Iterable[nn.Module]) -> Iterator[None]:
    """Every eager switch of ``owners`` flipped for the duration (nothing recorded, all restored)."""
    switches = [s for owner in dict.fromkeys(owners) for s in eager_switches(owner)]
    seen: set[tuple[int, str]] = set()
    done: list[EagerSwitch] = []
    try:
        for switch in switches:
            if (id(switch.obj), switch.attr) not in seen:  # a Hugging Face config is shared by the owners
                seen.add((id(switch.obj), switch.attr))
                setattr(switch.obj, switch.attr, switch.value)
                done.append(switch)
        yield
    finally:
        for switch in reversed(done):
            setattr(switch.obj, switch.attr, switch.original)


def eager_calls(
    root: nn.Module, run: Callable[[], Any], pairs: Iterable[tuple[nn.Module, nn.Module]]
) -> set[int]:
    """Of ``(owner, module)`` pairs whose owner runs past ``module``, the ids of the modules their owner calls
    once switched to its eager path (one probing forward with the switches flipped, then restored)."""
    pairs = [(owner, module) for owner, module in pairs if eager_switches(owner)]
    if not pairs:
        return set()
    with _switched(owner for owner, _ in pairs):
        probed = probe(root, run, [], [m for _, m in pairs])
    if probed is None:
        return set()
    return {id(m) for _, m in pairs if id(m) in probed.called}


def transformers_major(owner: nn.Module) -> tuple[str, int] | None:
    """``(version, major)`` of the transformers that defines ``owner``'s class, or ``None`` for other
    classes (read from the imported package: nothing is imported here)."""
    if not type(owner).__module__.startswith("transformers."):
        return None
    version = str(getattr(sys.modules.get("transformers"), "__version__", "") or "")
    head = version.split(".")[0]
    return (version, int(head)) if head.isdigit() else None


def bypass_hint(owner: nn.Module, eager_helps: bool) -> str:
    """How to act on a dropout module ``owner`` runs past, for the library and version at hand: the eager
    switch when it makes ``owner`` call the module (measured: :func:`eager_calls`), else what works instead."""
    switches = eager_switches(owner)
    if eager_helps and switches:
        done = ", ".join(s.describe() for s in switches)
        same = (
            ' (as `model.set_attn_implementation("eager")` does)'
            if any(s.attr == "_attn_implementation" for s in switches)
            else ""
        )
        return f"or switch the owner to its eager path ({done}){same}, which eager=True does for you"
    found = transformers_major(owner)
    if found is not None and found[1] >= 5:
        return (
            f"only variant 'standard' can act there: transformers {found[0]} passes the module's `.p` to the attention "
            "kernel on every attention implementation, eager included (`attn_implementation`/"
            "`set_attn_implementation` cannot change that); put another variant on a module after the attention "
            "(BERT: `attention.output.dropout`; GPT-2: `attn.resid_dropout`)"
        )
    if found is not None:
        return (
            f"only variant 'standard' can act there as built: transformers {found[0]} fixes the attention class when "
            'the model is built, so build it with `attn_implementation="eager"` (`from_pretrained(..., '
            'attn_implementation="eager")`, or in its config), whose attention calls the module'
        )
    return "only variant 'standard' can act there (or exclude the site)"
