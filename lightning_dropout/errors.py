"""The one error type of lightning-dropout, and helpers that word messages the house way."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

__all__ = ["ConfigError", "DropoutConfigError", "check_rate", "closest"]

# "`x` must ..., but got ...", with the key path that may precede it ("dropout.groups['hidden']: ")
_RULE_BROKEN = re.compile(
    r"(?:[A-Za-z_][\w.\[\]'\"-]*: )?`[^`]+` (must|needs|names) .*?but got .*?(?=\s+- |\s+Given value|$)"
)


class DropoutConfigError(ValueError):
    """Raised when a rule, plan, variant or schedule is misconfigured.

    Every message states the rule that was broken, shows the offending value and, where there is a
    finite set of valid values, lists the choices (or the nearest ones).
    """


class ConfigError(Exception):
    """A class named in the config refused its arguments (raised while instantiating it; see
    :mod:`lightning_dropout.config`). Defined here, with no Lightning import, so the CLI can catch it cheaply."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` entries of ``choices`` nearest to ``word`` (by difflib ratio), best first."""
    pool = list(dict.fromkeys(choices))
    near = difflib.get_close_matches(word, pool, n=n, cutoff=0.4)
    if not near:
        # Fall back on substring matches so that ``lin`` still finds ``net.linear1``.
        near = [c for c in pool if word.lower() in c.lower()][:n]
    return near


def check_rate(p: object, name: str = "p") -> float:
    """Validate a dropout rate: a real number with ``0 <= p < 1``; returns it as ``float``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise DropoutConfigError(f"`{name}` must be a number with 0 <= {name} < 1, but got {name}={p!r}.")
    value = float(p)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise DropoutConfigError(f"`{name}` must satisfy 0 <= {name} < 1, but got {name}={p!r}.")
    return value


def summarize(message: str) -> str:
    """One line: the house-style sentence ("`x` must ..., but got ...") buried in a long (jsonargparse union)
    message if there is one, else the whole message with its whitespace collapsed."""
    flat = " ".join(str(message).split())
    found = _RULE_BROKEN.search(flat)
    return found.group(0) if found else flat
