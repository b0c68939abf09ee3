"""Dropout variants: one registry, each a module and a functional twin (torch only).

Importing this package registers every built-in variant in :data:`VARIANTS`.
"""

from lightning_dropout.variants._base import (
    VARIANTS,
    DropoutVariant,
    build_variant,
    get_variant,
    keep_mask,
    register_variant,
    variant_names,
)
from lightning_dropout.variants.alpha import (
    AlphaDropout,
    FeatureAlphaDropout,
    alpha_dropout,
    feature_alpha_dropout,
)
from lightning_dropout.variants.concrete import ConcreteDropout, concrete_dropout, concrete_regularizer
from lightning_dropout.variants.dropblock import DropBlock, drop_block, seed_rate
from lightning_dropout.variants.droppath import DropPath, drop_path
from lightning_dropout.variants.gaussian import GaussianDropout, gaussian_dropout
from lightning_dropout.variants.spatial import SpatialDropout, spatial_dropout
from lightning_dropout.variants.standard import AttentionDropout, Dropout, attention_dropout, dropout
from lightning_dropout.variants.variational import VariationalDropout, variational_dropout
from lightning_dropout.variants.weight import WeightDropout, weight_dropout

__all__ = [
    "VARIANTS",
    "AlphaDropout",
    "AttentionDropout",
    "ConcreteDropout",
    "DropBlock",
    "DropPath",
    "Dropout",
    "DropoutVariant",
    "FeatureAlphaDropout",
    "GaussianDropout",
    "SpatialDropout",
    "VariationalDropout",
    "WeightDropout",
    "alpha_dropout",
    "attention_dropout",
    "build_variant",
    "concrete_dropout",
    "concrete_regularizer",
    "drop_block",
    "drop_path",
    "dropout",
    "feature_alpha_dropout",
    "gaussian_dropout",
    "get_variant",
    "keep_mask",
    "register_variant",
    "seed_rate",
    "spatial_dropout",
    "variant_names",
    "variational_dropout",
    "weight_dropout",
]
