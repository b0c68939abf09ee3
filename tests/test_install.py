"""What a fresh install needs: every package the library imports is declared in pyproject.toml, and the plain
callback stands without the tuner's dependencies (the decision in docs/architecture.md, "Dependencies")."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _optional_imports(tree: ast.AST) -> set[int]:
    """The ids of the import statements in the body of a ``try`` that catches ``ImportError``: optional
    packages (a dev extra the code uses when it is there), which a fresh install need not bring."""
    optional: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return optional


def _imported_packages(optional: bool = False) -> dict[str, str]:
    """Top-level third-party modules imported anywhere under lightning_dropout/ (in functions too), to the
    first file that imports each; those imported only under ``try: ... except ImportError`` with
    ``optional``, else left out."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "lightning_dropout").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = _optional_imports(tree)
        for node in ast.walk(tree):
            if (id(node) in guarded) != optional:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("lightning_dropout", "__future__"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_normalize(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]) for req in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    imported = _imported_packages()
    assert "sqlalchemy" in imported  # the case that was missing; keeps this test honest
    missing = {
        module: where
        for module, where in imported.items()
        if not {_normalize(d) for d in distributions.get(module, [module])} & declared
    }
    assert missing == {}, f"imported but not in [project].dependencies: {missing}"


def test_optional_packages_are_dev_extras():
    # imported under `try: ... except ImportError` (used when installed): declared as an extra, never core
    optional = _imported_packages(optional=True)
    assert "optuna_dashboard" in optional  # records.py writes the winner's note through it when installed
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = {
        _normalize(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0])
        for reqs in project["optional-dependencies"].values()
        for r in reqs
    }
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        m: where
        for m, where in optional.items()
        if not {_normalize(d) for d in distributions.get(m, [m])} & extras
    }
    assert undeclared == {}, (
        f"optional imports not in any [project.optional-dependencies] extra: {undeclared}"
    )


def test_the_plain_callback_does_not_import_the_tuner():
    code = (
        "import sys, lightning_dropout.callback, lightning_dropout.monitor, lightning_dropout.injection\n"
        "print(sorted(m for m in ('optuna', 'sqlalchemy', 'jsonargparse') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_readme_says_how_to_install_the_cpu_build_of_torch():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme
    # the two main commands stay as they are
    assert (
        "pip install torch==2.13.0 && pip install -e . && lightning-dropout tune configs/quickstart.yaml"
        in readme
    )


def _requirement(name: str) -> Any:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    found = [Requirement(r) for r in project["dependencies"] if _normalize(Requirement(r).name) == name]
    assert len(found) == 1, f"{name} must be declared once in [project].dependencies"
    return found[0]


def test_sqlalchemy_floor_takes_postgresql_urls_to_psycopg_3():
    # the `postgres` extra installs psycopg 3; a bare postgresql:// URL reaches it only from SQLAlchemy 2.1 on
    # (2.0 picks psycopg2, which nothing installs)
    spec = _requirement("sqlalchemy").specifier
    assert not spec.contains("2.0.54") and spec.contains("2.1.1")  # 2.1.1: the wheel the offline index holds
    assert spec.contains(importlib.metadata.version("sqlalchemy"))
    from sqlalchemy.engine import make_url

    assert make_url("postgresql://u@localhost/db").get_dialect().driver == "psycopg"


def test_jsonargparse_is_bounded_below_its_next_major():
    # lightning_dropout/config.py parses jsonargparse's error messages: a new major may reword them
    from packaging.version import Version

    spec = _requirement("jsonargparse").specifier
    installed = Version(importlib.metadata.version("jsonargparse"))
    assert spec.contains(str(installed))
    assert not spec.contains(f"{installed.major + 1}.0.0")
