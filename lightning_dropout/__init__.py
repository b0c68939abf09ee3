"""lightning-dropout: the right dropout in the right places of any PyTorch Lightning model.

The layers, with arrows pointing one way: :mod:`~lightning_dropout.variants`, :mod:`~lightning_dropout.plan`,
:mod:`~lightning_dropout.inject`, :mod:`~lightning_dropout.schedules` and :mod:`~lightning_dropout.mc` know
only torch; :mod:`~lightning_dropout.callback` knows Lightning; the CLI alone reads argv.
"""

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.inject import (
    Rule,
    applied_plan,
    apply_plan,
    describe,
    format_sites,
    inject,
    output_layer,
    resolve,
    site_handles,
    undo,
)
from lightning_dropout.plan import DropoutPlan, Site
from lightning_dropout.variants import VARIANTS, build_variant, get_variant, variant_names

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
    "format_sites",
    "get_variant",
    "inject",
    "output_layer",
    "resolve",
    "site_handles",
    "undo",
    "variant_names",
]
