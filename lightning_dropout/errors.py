"""The one error type of lightning-dropout, and helpers that word messages the house way."""

from __future__ import annotations

import dataclasses
import difflib
import errno
import functools
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

_T = TypeVar("_T")

__all__ = [
    "DropoutConfigError",
    "Interrupted",
    "UnwritableError",
    "check_instance",
    "check_int",
    "check_number",
    "check_rate",
    "closest",
    "strict_init",
    "unwritable",
]

# "`x` must ..., but got ...", with the key path that may precede it ("dropout.groups['hidden']: ")
_RULE_BROKEN = re.compile(
    r"(?:[A-Za-z_][\w.\[\]'\"/-]*: )?`[^`]+` (must|needs|names) .*?but got .*?(?=\s+- |\s+Given value|$)"
)


# the alternatives jsonargparse lists for every union, which never are the reason
_UNION_NOISE = (
    "Not a valid subclass",
    "Expected a <class 'NoneType'>",
    "a class path",
    "a dict ",
    "Subclass types",
)


class DropoutConfigError(ValueError):
    """Raised when a rule, plan, variant, schedule, config file, a key in it or a class it names is wrong: the
    one error type for user input (the CLI prints it in one line and exits 2).

    Every message states the rule that was broken, shows the offending value and, where there is a
    finite set of valid values, lists the choices (or the nearest ones).
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a study: ``kept`` finished trials are in the storage (a re-run resumes from them)."""

    def __init__(self, kept: int) -> None:
        super().__init__(kept)
        self.kept = kept


class UnwritableError(DropoutConfigError):
    """A study or run could not write its storage or files (a full disk, a file-size limit, a read-only file
    system or database): the run stops in one line, keeping what it stored, and resumes once there is room."""


_UNWRITABLE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "a file grew past the size limit",
    errno.EROFS: "the file system is read-only",
    errno.EDQUOT: "the disk quota is exceeded",
}
# what the same faults read like once a database driver, or a trial's process, has turned them into text
_UNWRITABLE_TEXTS = {
    "database or disk is full": "the database or the disk is full",
    "disk i/o error": "the disk failed a write (SQLite: disk I/O error; a full disk or a file-size limit)",
    "readonly database": "the database is read-only",
    "read-only transaction": "the database is read-only",
    "no space left on device": "no space left on the device",
    "could not extend file": "no space left for the database",
    "diskfull": "no space left for the database",
    "file too large": "a file grew past the size limit",
    "read-only file system": "the file system is read-only",
    "disk quota exceeded": "the disk quota is exceeded",
}


def unwritable(err: BaseException) -> str | None:
    """Why ``err`` (or an error it was raised from) is a failure to write storage, in a few words; ``None``
    for any other error.

    Example:
        >>> unwritable(OSError(28, "No space left on device"))
        'no space left on the device'
        >>> unwritable(RuntimeError("OperationalError: (sqlite3.OperationalError) database or disk is full"))
        'the database or the disk is full'
        >>> unwritable(ValueError("bad")) is None
        True
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _UNWRITABLE_ERRNOS:
            return _UNWRITABLE_ERRNOS[current.errno]
        text = str(current).lower()
        for marker, reason in _UNWRITABLE_TEXTS.items():
            if marker in text:
                return reason
        current = current.__cause__ or current.__context__
    return None


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` entries of ``choices`` nearest to ``word`` (by difflib ratio), best first."""
    pool = list(dict.fromkeys(choices))
    near = difflib.get_close_matches(word, pool, n=n, cutoff=0.4)
    if not near:
        # Fall back on substring matches so that ``lin`` still finds ``net.linear1``.
        near = [c for c in pool if word.lower() in c.lower()][:n]
    return near


def strict_init(cls: type[_T]) -> type[_T]:
    """Make a dataclass refuse an unknown or surplus argument with a :class:`DropoutConfigError` naming the
    argument, the nearest field and every field (instead of Python's bare ``TypeError``)."""
    init: Callable[..., None] = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise DropoutConfigError(
                f"`{cls.__name__}` takes the arguments {names}, but got unknown {unknown}; nearest: "
                f"{closest(unknown[0], names)}."
            )
        if len(args) > len(names):
            raise DropoutConfigError(
                f"`{cls.__name__}` takes at most {len(names)} arguments {names}, but got {len(args)} positional."
            )
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def check_rate(p: object, name: str = "p") -> float:
    """Validate a dropout rate: a real number with ``0 <= p < 1``; returns it as ``float``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise DropoutConfigError(f"`{name}` must be a number with 0 <= {name} < 1, but got {name}={p!r}.")
    value = float(p)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise DropoutConfigError(f"`{name}` must satisfy 0 <= {name} < 1, but got {name}={p!r}.")
    return value


def check_instance(value: object, kind: type, name: str, call: str, what: str | None = None) -> Any:
    """Validate that argument ``name`` of ``call`` is a ``kind`` (``what`` names it in the message); returns it.

    Example:
        >>> check_instance("x", int, "model", "inject(model, rules)", "an nn.Module")
        Traceback (most recent call last):
        ...
        lightning_dropout.errors.DropoutConfigError: `inject(model, rules)` takes an nn.Module as `model`, but got str 'x'.
    """
    if not isinstance(value, kind):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise DropoutConfigError(
            f"`{call}` takes {what or 'a ' + kind.__qualname__} as `{name}`, but got {type(value).__name__} {shown}."
        )
    return value


def check_int(
    value: object,
    name: str,
    minimum: int = 1,
    *,
    key: str | None = None,
    or_none: str = "",
    maximum: int | None = None,
) -> Any:
    """Validate an integer ``>= minimum`` (and ``<= maximum`` when given; ``True``/``False`` refused); returns
    it. ``key`` is the name shown in backticks (default ``name``, e.g. ``study.n_trials``); with ``or_none``
    (``"None"``, ``"null"``) ``None`` is accepted too and the message says so.

    Example:
        >>> check_int(3, "n_samples", 2)
        3
        >>> check_int(0, "n_trials", key="study.n_trials")
        Traceback (most recent call last):
        ...
        lightning_dropout.errors.DropoutConfigError: `study.n_trials` must be an integer >= 1, but got n_trials=0.
    """
    if value is None and or_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        alt = f" or {or_none}" if or_none else ""
        rule = f">= {minimum}" if maximum is None else f"with {minimum} <= {name} <= {maximum:,}"
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({len(str(value))} digits)"
        raise DropoutConfigError(f"`{key or name}` must be an integer {rule}{alt}, but got {name}={shown}.")
    return value


def check_number(
    value: object,
    name: str,
    minimum: float = 0.0,
    *,
    inclusive: bool = False,
    key: str | None = None,
    or_none: str = "",
) -> Any:
    """Validate a real number ``> minimum`` (``>= minimum`` with ``inclusive``; ``True``/``False`` and NaN
    refused); returns it. ``key`` and ``or_none`` as in :func:`check_int`.

    Example:
        >>> check_number(0.5, "temperature")
        0.5
        >>> check_number(0, "gamma")
        Traceback (most recent call last):
        ...
        lightning_dropout.errors.DropoutConfigError: `gamma` must be a number > 0, but got gamma=0.
    """
    if value is None and or_none:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value >= minimum if inclusive else value > minimum):  # type: ignore[operator]
        alt = f" or {or_none}" if or_none else ""
        raise DropoutConfigError(
            f"`{key or name}` must be a number {'>=' if inclusive else '>'} {minimum:g}{alt}, but got {name}={value!r}."
        )
    return value


def summarize(message: str) -> str:
    """One line: the house-style sentence ("`x` must ..., but got ...") buried in a long (jsonargparse union)
    message if there is one, else the whole message with its whitespace collapsed."""
    flat = " ".join(str(message).split())
    found = _RULE_BROKEN.search(flat)
    if found:
        return found.group(0)
    if "Does not validate against any of the Union subtypes" in flat:  # jsonargparse: the one real reason
        prefix = flat[: flat.index("Does not validate")].strip()
        for item in flat.split(" - ")[1:]:
            if not item.startswith(_UNION_NOISE):
                return f"{prefix} {item.strip()}".strip()
    return flat
