"""The package's import graph, read from the source (function-level imports included): no module reaches itself
through its imports, so every layer can be read, tested and changed from the bottom up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_dropout"


def _graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            # a module importing its own package (its __init__ re-exports it) is not an arrow back up
            graph[name] |= {t for t in targets if t in modules and t != name and not name.startswith(f"{t}.")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert len(graph) > 60 and graph["lightning_dropout.tune.workers"]  # the source was read
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


_ATTRS = ("user_attrs", "system_attrs")


def _literal_trial_attribute_keys(source: str) -> list[str]:
    """Where ``source`` names a study or trial attribute by a string literal instead of a records.py constant."""
    out = []
    for node in ast.walk(ast.parse(source)):
        key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            method, owner = node.func.attr, node.func.value
            if method in ("set_user_attr", "set_system_attr") or (
                method in ("get", "pop") and isinstance(owner, ast.Attribute) and owner.attr in _ATTRS
            ):
                key = node.args[0]
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr in _ATTRS
        ):
            key = node.slice
        elif isinstance(node, ast.Compare) and any(
            isinstance(c, ast.Attribute) and c.attr in _ATTRS for c in node.comparators
        ):
            key = node.left
        if isinstance(key, (ast.Constant, ast.JoinedStr)):
            out.append(f"line {node.lineno}: {ast.unparse(key)}")
    return out


def test_the_study_schema_lives_in_records():
    # every attribute a study or trial stores is named once, in tune/records.py; the others use its constants
    found = {
        str(path.relative_to(PACKAGE)): keys
        for path in PACKAGE.rglob("*.py")
        if path.name != "records.py"
        for keys in [_literal_trial_attribute_keys(path.read_text(encoding="utf-8"))]
        if keys
    }
    assert found == {}
    # the check sees each form a key can take
    sample = (
        "t.set_user_attr('a', 1)\nt.user_attrs['b']\nt.system_attrs.get('c')\n'd' in t.user_attrs\n"
        "t.set_user_attr(f'{P}x', 1)\nt.set_user_attr(KEY, 1)\nt.user_attrs[KEY]\n"
    )
    assert len(_literal_trial_attribute_keys(sample)) == 5
