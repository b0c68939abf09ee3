"""The one YAML reader for what users write (config files and plan files): YAML's safe loader, refusing a
mapping that repeats a key (YAML itself keeps the last silently) and a document whose aliases expand past a
size limit (an "alias bomb" loads in a blink and then explodes every copy of it), and accepting merge keys
(``<<: *defaults``), whose keys a mapping may override. Knows only PyYAML."""

from __future__ import annotations

from typing import Any

import yaml

from lightning_dropout.errors import DropoutConfigError

__all__ = ["MAX_ALIAS_NODES", "load_yaml"]

MAX_ALIAS_NODES = 10_000  # the nodes that aliases may add to a document, counted as expanded
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """:func:`load_yaml`'s loader."""


def _size(node: yaml.Node, memo: dict[int, int]) -> int:
    """The nodes of ``node`` with every alias expanded (shared subtrees counted once per use)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive document counts once
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_size(k, memo) + _size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_size(v, memo) for v in node.value)
    else:
        total = 1
    memo[id(node)] = total
    return total


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:  # `<<: *base`: the mapping's own keys may override the merged ones
            continue
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]`: YAML allows it, Python mappings do not
            kind = "a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
            raise DropoutConfigError(
                f"line {line}: a mapping's key must be a plain value such as a name or a number, but this one "
                f"is {kind} (a YAML complex key, `? ...`)."
            )
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DropoutConfigError(
                f"line {line}: key `{key}` must appear once in its mapping, but it appears twice (lines "
                f"{seen[key]} and {line}); YAML would keep only the last."
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str) -> Any:
    """``text`` parsed as one YAML document by the strict safe loader (see the module docstring); raises
    :class:`~lightning_dropout.errors.DropoutConfigError` for a repeated key or an alias bomb, and
    ``yaml.YAMLError`` for text that is not YAML.

    Example:
        >>> load_yaml("base: &b {p: 0.1, variant: standard}\\nsite: {<<: *b, p: 0.2}")["site"]
        {'p': 0.2, 'variant': 'standard'}
        >>> load_yaml("a: 1\\na: 2")
        Traceback (most recent call last):
        ...
        lightning_dropout.errors.DropoutConfigError: line 2: key `a` must appear once in its mapping, but it appears twice (lines 1 and 2); YAML would keep only the last.
    """
    loader = _StrictLoader(text)
    try:
        return _load(loader, text)
    except RecursionError:  # PyYAML composes and constructs recursively
        raise DropoutConfigError(
            "a YAML document must nest its lists and mappings at most a few hundred levels deep, but this one "
            "nests deeper than Python can read."
        ) from None
    finally:
        loader.dispose()


def _load(loader: _StrictLoader, text: str) -> Any:
    node = loader.get_single_node()
    if node is None:
        return None
    size = _size(node, {}) if "*" in text else 0  # only aliases can make a document outgrow its text
    if size > MAX_ALIAS_NODES:
        raise DropoutConfigError(
            f"a YAML document must stay under {MAX_ALIAS_NODES:,} nodes once its aliases (*name) are "
            f"expanded, but this one has {size:,}: an alias bomb?"
        )
    return loader.construct_document(node)
