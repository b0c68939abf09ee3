"""Keeping credentials out of output and files: ``redact`` a URL, or every URL in a text (SQLAlchemy, when
installed, parses the URLs to remember).

A storage URL may carry a password (``postgresql://user:PASSWORD@host/db``, ``...?password=PASSWORD``).
Everything lightning-dropout prints, logs or writes (error messages, the saved ``config.yaml`` of a run, trial
files, HTML reports) goes through :func:`redact` first.

Two layers. The URLs this process was given (the command line, ``$LIGHTNING_DROPOUT_STORAGE``, a study's
``storage``) are parsed as SQLAlchemy parses them and their passwords remembered (:func:`remember`), so they
are hidden whatever characters they hold (``?``, spaces, quotes, ``<``, ``/``, ``@``), raw, percent-encoded or
decoded. Any other URL in a text is redacted by its shape: the ``user:password@`` part up to the last ``@``
and ``password=``-like query parameters.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote

__all__ = ["redact", "redact_value", "remember", "remember_urls"]

# scheme://rest, the rest up to whitespace or a quote (URLs inside messages and reprs)
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][\w+.-]*://)(?P<rest>[^\s'\"<>`]*)")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:password|passwd|pwd|pass|secret|token)=)[^&;]*")
_QUERY_VALUE = re.compile(r"(?i)[?&;](?:password|passwd|pwd|pass|secret|token)=([^&;\s]*)")
# a URL's scheme and the rest of its line, for remember_urls (passwords may hold spaces and quotes)
_URL_LINE = re.compile(r"\b[A-Za-z][\w+.-]*://[^\r\n]*")
_ANYWHERE = 8  # a remembered password this long is hidden wherever it appears; a shorter one beside : and @

_remembered: dict[str, None] = {}  # the passwords of the URLs this process was given (an ordered set)


def _redact_url(match: re.Match[str]) -> str:
    scheme, rest = match.group("scheme"), match.group("rest")
    at = rest.rfind("@")  # the last '@': a password may itself hold '@', '/' or '?'
    user = rest[:at].partition(":")[0] if at > 0 else ""
    if at > 0 and ":" in rest[:at] and not rest.startswith("/") and not set(user) & set("/?#"):
        rest = f"{user}:***{rest[at:]}"
    cut = rest.find("?", rest.find("@") + 1)
    head, query = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
    return scheme + head + _QUERY_SECRET.sub(r"\1***", query)


def remember(url: str) -> None:
    """Remember the password of ``url`` (as SQLAlchemy's ``make_url`` reads it, and as typed) so that
    :func:`redact` hides it wherever this process prints or writes it.

    Example:
        >>> remember("postgresql://user:pa ss?@host/db")
        >>> redact("could not connect with user:pa ss?@host")
        'could not connect with user:***@host'
    """
    text = str(url)
    if "://" not in text:
        return
    found: list[str] = []
    rest = text.split("://", 1)[1]
    ats = {rest.find("@"), rest.rfind("@")} - {-1}  # SQLAlchemy splits at the first '@', redact at the last
    for at in sorted(ats):
        user, colon, password = rest[:at].partition(":")
        if colon and password and "/" not in user:
            found.append(password)
    found += _QUERY_VALUE.findall(rest)
    try:  # the password as the driver receives it (decoded), when SQLAlchemy is installed
        from sqlalchemy.engine import make_url

        parsed = make_url(text).password
        if parsed:
            found.append(str(parsed))
    except Exception:  # not a URL SQLAlchemy reads (journal:, a typo): the shapes above still hold
        pass
    for secret in list(found):
        found += [unquote(secret), quote(secret, safe=""), quote(secret, safe="+ ")]
    for secret in found:
        if secret and secret != "***":
            _remembered[secret] = None


def remember_urls(text: str) -> None:
    """:func:`remember` every URL in ``text`` (a command line argument, a config file), each read to the end
    of its line, since a password may hold spaces and quotes."""
    for match in _URL_LINE.finditer(str(text)):
        line = match.group(0).rstrip()
        remember(line)
        remember(line.rstrip("'\""))


def _hide_remembered(text: str) -> str:
    for secret in sorted(_remembered, key=len, reverse=True):
        if secret not in text:
            continue
        if len(secret) >= _ANYWHERE:
            text = text.replace(secret, "***")
        else:
            text = text.replace(f":{secret}@", ":***@").replace(f"={secret}", "=***")
    return text


def redact(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) with every password replaced by ``***``: the passwords of
    the URLs this process was given (:func:`remember`), the ``user:password@`` part of any URL (the password
    may contain ``/``, ``:``, ``?`` or ``@``) and ``password=``, ``passwd=``, ``pwd=`` query parameters.

    Example:
        >>> redact("postgresql://user:p/a@ss@host/db?passwd=x&sslmode=require")
        'postgresql://user:***@host/db?passwd=***&sslmode=require'
    """
    return _URL.sub(_redact_url, _hide_remembered(str(text)))


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
