"""Griffe extension: Sphinx roles and RST literals in the package's docstrings, rendered for mkdocstrings.

The docstrings are Google style but cross-reference with Sphinx roles (``:class:`~lightning_dropout.plan.Site```,
``:func:`register_variant```) and write code as RST double backticks. This turns

* a role whose target resolves to an object of the package into an optional mkdocs-autorefs link (``~`` shows
  only the last name), relative names being looked up from the documented object outwards;
* any other role (``torch.nn.utils.rnn.PackedSequence``) into inline code;
* ````code```` into ```code```.

Optional links never fail the strict build: a target that is not rendered anywhere stays plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`(~?)([\w.]+)(?:\(\))?`")
_LITERAL = re.compile(r"``(.+?)``", flags=re.DOTALL)


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` seen from ``obj``: absolute, or a member of ``obj`` or of one of its parents."""
    if name.startswith("lightning_dropout"):
        return name
    head = name.split(".")[0]
    scope: Any = obj
    while scope is not None:
        if head in getattr(scope, "members", {}) or getattr(scope, "name", None) == head:
            base = scope.path if head in scope.members else scope.parent.path if scope.parent else ""
            return f"{base}.{name}" if base else name
        scope = scope.parent
    return None


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring once, when its object is loaded (see the module docstring)."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        obj.docstring.value = _rewrite(obj, obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:  # the root is not an `on_object`
        self.on_object(obj=pkg)


def _rewrite(obj: griffe.Object, text: str) -> str:
    def role(match: re.Match) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name
        target = _resolve(obj, name)
        if target is None or not target.startswith("lightning_dropout"):
            return f"`{shown}`"
        return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'

    text = _ROLE.sub(role, text)
    return _LITERAL.sub(lambda m: "`" + m.group(1).replace("\n", " ") + "`", text)
