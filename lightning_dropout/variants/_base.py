"""The registry of dropout variants and the base class every variant module derives from."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from lightning_dropout.errors import DropoutConfigError, check_rate, closest

__all__ = ["VARIANTS", "DropoutVariant", "build_variant", "get_variant", "register_variant", "variant_names"]

VARIANTS: dict[str, type[DropoutVariant]] = {}
"""Registry: variant name -> module class. Filled by :func:`register_variant`."""

_V = TypeVar("_V", bound="type[DropoutVariant]")


def register_variant(name: str) -> Callable[[_V], _V]:
    """Class decorator adding a :class:`DropoutVariant` subclass to :data:`VARIANTS` under ``name``."""

    def decorate(cls: _V) -> _V:
        if name in VARIANTS and VARIANTS[name] is not cls:
            raise DropoutConfigError(
                f"variant names must be unique, but {name!r} is already {VARIANTS[name]}."
            )
        cls.variant_name = name
        VARIANTS[name] = cls
        return cls

    return decorate


def variant_names() -> list[str]:
    """Names of all registered variants, sorted."""
    return sorted(VARIANTS)


def get_variant(name: str) -> type[DropoutVariant]:
    """The module class registered as ``name``; unknown names fail listing the known ones."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        near = closest(str(name), VARIANTS)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise DropoutConfigError(
            f"`variant` must be one of {variant_names()}, but got variant={name!r}.{hint}"
        ) from None


def build_variant(name: str, p: float, **params: Any) -> DropoutVariant:
    """Instantiate variant ``name`` with rate ``p`` and its own ``params`` (validated against its signature)."""
    cls = get_variant(name)
    cls.check_param_names(params)
    return cls(p, **params)


class DropoutVariant(nn.Module):
    """Base class of every variant: holds the rate ``p``, the train/eval switch and drop tracking.

    Subclasses implement :meth:`forward` and may override :meth:`check_input` (a shape test used by the
    injection engine to name the site when a variant cannot apply) and ``extra_repr``. A variant's maths is
    written once, in a kernel ``_apply(x, p, ..., generator) -> (output, keep-mask)`` of its module, which both
    its functional twin and its ``forward`` call (``forward``: ``if not self._active(x): return x``, then the
    kernel, then ``self._record(keep)``).

    Attributes:
        p: the dropout rate; schedules change it between steps through :meth:`set_rate`.
        track: when ``True``, every training forward records :attr:`drop_fraction`, the measured fraction of
            units dropped by the last mask (``None`` for variants that drop nothing, e.g. ``gaussian``).
            Off by default: measuring costs a reduction per forward.
        generator: optional :class:`torch.Generator` the masks are drawn from instead of the global one.
    """

    variant_name: ClassVar[str] = ""
    #: whether the variant removes units (so a drop fraction is meaningful).
    drops_units: ClassVar[bool] = True
    #: whether :meth:`set_rate` may change ``p`` (``False`` for learned rates).
    schedulable: ClassVar[bool] = True

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = self.checked_rate(p)
        self.track = False
        self.drop_fraction: Tensor | None = None
        self.generator: torch.Generator | None = None

    @classmethod
    def param_names(cls) -> list[str]:
        """Keyword parameters the variant takes besides ``p``."""
        sig = inspect.signature(cls.__init__)
        return [n for n in list(sig.parameters)[1:] if n != "p"]

    @classmethod
    def check_param_names(cls, params: Mapping[str, Any]) -> None:
        """Raise unless every key of ``params`` is one of :meth:`param_names`."""
        allowed = cls.param_names()
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise DropoutConfigError(
                f"variant {cls.variant_name!r} takes the parameters {allowed or '(none)'}, but got unknown {unknown}."
            )

    @classmethod
    def checked_rate(cls, p: object) -> float:
        """The rate ``p`` validated for this variant (``0 <= p < 1``); the constructor and
        :meth:`check_params` both use it."""
        return check_rate(p)

    @classmethod
    def checked_param(cls, name: str, value: Any) -> Any:
        """Parameter ``name``'s ``value`` validated (and normalized) as the constructor stores it; a variant
        with parameters overrides it, and its constructor stores what it returns. Most take any value."""
        return value

    @classmethod
    def check_params(cls, p: object, params: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
        """``(p, params)`` validated without building a module: the rate, the parameter names and each value
        (through :meth:`checked_rate` and :meth:`checked_param`, as the constructor checks them). A
        :class:`~lightning_dropout.Rule` and a :class:`~lightning_dropout.Site` check with it; the injection
        engine builds one module per site.

        Example:
            >>> from lightning_dropout.variants import DropBlock
            >>> DropBlock.check_params(0.1, {"block_size": 5})
            (0.1, {'block_size': 5})
        """
        if not isinstance(params, Mapping):
            raise DropoutConfigError(f"`params` must be a mapping, but got params={params!r}.")
        cls.check_param_names(params)
        return cls.checked_rate(p), {name: cls.checked_param(name, value) for name, value in params.items()}

    @classmethod
    def params_from_target(cls, module: nn.Module, where: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` completed with what the variant reads off the module it is attached to ``where`` (an
        RNN's layout, the names of its weights); the injection engine calls it for every site. Most variants
        read nothing."""
        return dict(params)

    def params(self) -> dict[str, Any]:
        """The variant's own parameters (besides ``p``), as given to the constructor."""
        return {n: getattr(self, n) for n in self.param_names()}

    def set_rate(self, p: float) -> None:
        """Change the rate (used by schedules); validated like the constructor argument."""
        if not self.schedulable:
            raise DropoutConfigError(
                f"variant {self.variant_name!r} learns its rate; it cannot be scheduled."
            )
        self.p = check_rate(p)

    def check_input(self, shape: torch.Size) -> str | None:
        """Return why an input of ``shape`` cannot be processed, or ``None`` when it can."""
        return None

    def _check(self, x: Tensor) -> None:
        reason = self.check_input(x.shape)
        if reason is not None:
            raise DropoutConfigError(
                f"variant {self.variant_name!r} {reason}, but got shape {tuple(x.shape)}."
            )

    def _active(self, x: object) -> bool:
        """Whether this forward drops anything (training with ``p > 0``); a tensor ``x`` is then checked
        against :meth:`check_input`, so a refused shape raises only where it would be dropped."""
        if not self.training or self.p == 0.0:
            return False
        if isinstance(x, Tensor):
            self._check(x)
        return True

    def _record(self, keep: Tensor | None) -> None:
        """Store the fraction of zeros in the (broadcastable) keep-mask when tracking is on.

        ``keep`` is ``None`` only where a kernel ran torch's fused op, which it does only when not tracking.
        """
        if self.track and keep is not None:
            self.drop_fraction = 1.0 - keep.detach().float().mean()

    def extra_repr(self) -> str:
        extras = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"p={self.p:g}" + (f", {extras}" if extras else "")


# returns dict[str, Any]: mypy cannot match a ``**dict[str, Generator]`` against torch.rand's overloads
def rng(generator: torch.Generator | None) -> dict[str, Any]:
    """``{"generator": g}`` or ``{}``: passing ``generator=None`` selects an overload of ``torch.rand`` that
    ``torch.compile`` cannot trace with a symbolic (changing) batch size."""
    return {"generator": generator} if generator is not None else {}


def keep_mask(
    shape: tuple[int, ...] | torch.Size, keep: float, like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """A Bernoulli(``keep``) mask of ``shape`` in ``like``'s dtype and device, drawn from ``generator``."""
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    noise = torch.rand(shape, dtype=dtype, device=like.device, **rng(generator))
    return (noise < keep).to(like.dtype)
