"""The built-in variants by name, each with its one-line summary, without importing torch: what
``lightning-dropout variants`` prints (torch alone takes over a second to import). ``tests`` check that this
table equals the registry (:data:`lightning_dropout.variants.VARIANTS`: the same names, each summary the first
line of the class docstring), so it cannot drift from it."""

from __future__ import annotations

__all__ = ["BUILTIN_VARIANTS"]

BUILTIN_VARIANTS: dict[str, str] = {
    "alpha": "Element-wise alpha dropout for SELU networks.",
    "attention": "Inverted dropout on attention probabilities ``(B, heads, T_query, T_key)``.",
    "concrete": "Dropout whose rate is a learned parameter.",
    "dropblock": "Drop ``block_size``-wide contiguous blocks of 1d or 2d feature maps.",
    "droppath": "Per-sample branch dropping.",
    "feature_alpha": "Channel-wise alpha dropout: input ``(N, C, *)``, one mask value per sample and channel.",
    "gaussian": "Multiplicative N(1, p/(1-p)) noise.",
    "spatial": "Drop whole channels of a feature map.",
    "standard": "Element-wise Bernoulli dropout.",
    "variational": "One dropout mask per sequence, the same at every time step.",
    "weight": "DropConnect on the weights of the module it is attached to.",
}
