"""lightning-dropout: the right dropout in the right places of any PyTorch Lightning model.

The layers, with arrows pointing one way: :mod:`~lightning_dropout.variants`, :mod:`~lightning_dropout.plan`,
the injection engine (:mod:`~lightning_dropout.injection`, which re-exports the public names of the modules it is
built from: ``rules``, ``handles`` and private ones), :mod:`~lightning_dropout.schedules` and
:mod:`~lightning_dropout.mc` know only torch; :mod:`~lightning_dropout.callback` knows Lightning; the CLI alone
reads argv.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any

from lightning_dropout.errors import DropoutConfigError

if TYPE_CHECKING:
    from lightning_dropout.injection import (
        Rule,
        applied_plan,
        apply_plan,
        describe,
        existing_dropout,
        format_sites,
        inject,
        output_layer,
        resolve,
        site_handles,
        undo,
    )
    from lightning_dropout.plan import DropoutPlan, Site
    from lightning_dropout.variants import VARIANTS, build_variant, get_variant, variant_names

# The public names and the module each lives in, imported on first use: `lightning-dropout --help` and
# `import lightning_dropout.cli` do not pay for torch.
_LAZY = {
    **dict.fromkeys(
        (
            "Rule",
            "applied_plan",
            "apply_plan",
            "describe",
            "existing_dropout",
            "format_sites",
            "inject",
            "output_layer",
            "resolve",
            "site_handles",
            "undo",
        ),
        "lightning_dropout.injection",
    ),
    **dict.fromkeys(("DropoutPlan", "Site"), "lightning_dropout.plan"),
    **dict.fromkeys(
        ("VARIANTS", "build_variant", "get_variant", "variant_names"), "lightning_dropout.variants"
    ),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _MovedModule(types.ModuleType):
    """The old module path ``lightning_dropout.inject``, kept for one release: the injection engine is
    :mod:`lightning_dropout.injection` now, so ``lightning_dropout.inject`` is only the function.
    ``from lightning_dropout.inject import X`` still works and warns once per name and place."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # module protocol lookups (``__path__``, ``__file__``), not the engine's
            raise AttributeError(name)
        warnings.warn(
            f"the module path `lightning_dropout.inject` is deprecated and goes in 0.2: import {name} from "
            "`lightning_dropout.injection` (or, for the public names, from `lightning_dropout`).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f"{__name__}.injection"), name)


# In sys.modules before any import of the old path, so the import system finds it there and never sets a
# submodule named `inject` on the package over the function.
sys.modules.setdefault(f"{__name__}.inject", _MovedModule(f"{__name__}.inject", _MovedModule.__doc__))

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "DropoutConfigError",
    "DropoutPlan",
    "Rule",
    "Site",
    "__version__",
    "applied_plan",
    "apply_plan",
    "build_variant",
    "describe",
    "existing_dropout",
    "format_sites",
    "get_variant",
    "inject",
    "output_layer",
    "resolve",
    "site_handles",
    "undo",
    "variant_names",
]
