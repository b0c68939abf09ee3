"""Keeping credentials out of output and files: ``redact`` a URL, or every URL in a text (no dependencies).

A storage URL may carry a password (``postgresql://user:PASSWORD@host/db``, ``...?password=PASSWORD``).
Everything lightning-dropout prints, logs or writes (error messages, the saved ``config.yaml`` of a run, trial
files, HTML reports) goes through :func:`redact` first.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["redact", "redact_value"]

# scheme://rest, the rest up to whitespace or a quote (URLs inside messages and reprs)
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][\w+.-]*://)(?P<rest>[^\s'\"<>`]*)")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:password|passwd|pwd|pass|secret|token)=)[^&;]*")


def _redact_url(match: re.Match[str]) -> str:
    scheme, rest = match.group("scheme"), match.group("rest")
    cut = rest.find("?")
    head, query = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
    at = head.rfind("@")  # the last '@': a password may itself hold '@' or '/'
    if at > 0 and not head.startswith("/"):  # user[:password]@host..., not a sqlite path
        user, colon, _ = head[:at].partition(":")
        if colon:
            head = f"{user}:***{head[at:]}"
    return scheme + head + _QUERY_SECRET.sub(r"\1***", query)


def redact(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) with every password replaced by ``***``: the
    ``user:password@`` part of a URL (the password may contain ``/``, ``:`` or ``@``) and ``password=``,
    ``passwd=``, ``pwd=`` query parameters.

    Example:
        >>> redact("postgresql://user:p/a@ss@host/db?passwd=x&sslmode=require")
        'postgresql://user:***@host/db?passwd=***&sslmode=require'
    """
    return _URL.sub(_redact_url, str(text))


def redact_value(value: Any) -> Any:
    """``value`` with :func:`redact` applied to every string inside it (lists, tuples, dicts, and objects with
    a mutable ``__dict__`` such as a jsonargparse ``Namespace``, copied, never changed in place)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if hasattr(value, "clone") and hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        copy = value.clone()
        for key, item in vars(copy).items():
            setattr(copy, key, redact_value(item))
        return copy
    return value
