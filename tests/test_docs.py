"""The documentation site builds with warnings as errors, and its generated pages cover the code.

One ``mkdocs build --strict`` (``mkdocs.yml``, hooks in ``docs/hooks.py``) into a temporary directory; the
tests read the HTML it wrote.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (
        importlib.util.find_spec("mkdocs") is None
        or importlib.util.find_spec("mkdocstrings_handlers") is None
    ):
        message = 'the docs need the dev extras: pip install -e ".[dev]"'
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's banner about its successor
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return out


def _fields(path: str, cls: str) -> list[str]:
    """The annotated fields of dataclass ``cls`` in ``path``, read from the source (importing the tuner would
    import Lightning, which costs this test more than the build's own import of it)."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]


def _commands() -> list[str]:
    """The keys of ``lightning_dropout.cli._VERBS``, read from the source (same reason)."""
    tree = ast.parse((ROOT / "lightning_dropout" / "cli.py").read_text(encoding="utf-8"))
    values = {}
    for n in tree.body:
        if isinstance(n, ast.Assign):
            values.update({t.id: n.value for t in n.targets if isinstance(t, ast.Name)})
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None:
            values[n.target.id] = n.value
    out: list[str] = []
    verbs = values["_VERBS"]
    for key, value in zip(verbs.keys, verbs.values, strict=True):
        if key is None:  # **{command: ... for command in _LIGHTNING_COMMANDS}
            out += [ast.literal_eval(e) for e in values[value.generators[0].iter.id].elts]
        else:
            out.append(ast.literal_eval(key))
    return out


def _variants() -> dict[str, str]:
    """Registered variant name -> class name, from the ``@register_variant("name")`` decorators in the source
    (importing the registry would import torch, which the build does anyway)."""
    out = {}
    for path in sorted((ROOT / "lightning_dropout" / "variants").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                for deco in node.decorator_list:
                    if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register_variant":
                        out[ast.literal_eval(deco.args[0])] = node.name
    return out


def _page(site: Path, path: str) -> str:
    file = site / path / "index.html"
    assert file.is_file(), f"{path} was not built"
    return file.read_text(encoding="utf-8")


def _text(html: str) -> str:
    """The page's visible text, tags removed."""
    return re.sub(r"<[^>]+>", "", html)


def test_every_variant_has_a_section_and_a_generated_figure(site):
    variants = _variants()
    assert {"standard", "spatial", "variational", "dropblock", "concrete"} <= set(variants)
    html = _page(site, "reference/variants")
    for name, cls in variants.items():
        assert f'id="{name}"' in html, f"no section for variant {name!r}"
        assert f"assets/variants/{name}.png" in html, f"the {name!r} section does not show its figure"
        assert f"{cls}(p=" in _text(html), f"no signature for {cls}"
        png = site / "assets" / "variants" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"


def test_yaml_reference_lists_every_key_of_the_schema(site):
    text = _text(_page(site, "reference/config"))
    study = _fields("lightning_dropout/tune/config.py", "StudyConfig")
    assert {"name", "metric", "storage", "workers"} <= set(study)
    for name in study:
        assert f"study.{name}" in text, f"study.{name} missing from the YAML reference"
    for name in _fields("lightning_dropout/tune/config.py", "DropoutSpace"):
        assert f"dropout.{name}" in text
    groups = text.split("dropout.groups[]")[-1]  # the section of the group keys
    for name in _fields("lightning_dropout/tune/space.py", "SearchGroup"):
        assert re.search(rf"^{name}$", groups, flags=re.MULTILINE), f"dropout.groups[].{name} missing"
    for key in ("model", "data", "trainer", "plan", "ckpt_path"):
        assert re.search(rf"^{key}$", text, flags=re.MULTILINE), f"top-level key {key!r} missing"


def test_cli_reference_shows_every_subcommand(site):
    commands = _commands()
    assert {"fit", "tune", "best", "describe"} <= set(commands)
    text = _text(_page(site, "reference/cli"))
    assert "usage: lightning-dropout" in text
    headings = re.findall(r"<h2[^>]*>(.*?)</h2>", _page(site, "reference/cli"), flags=re.DOTALL)
    covered = {c for h in headings for c in re.findall(r"<code>(\w+)</code>", h)}
    assert set(commands) <= covered, f"subcommands without a --help section: {set(commands) - covered}"
    assert "--study.n_trials" in text and "usage: lightning-dropout best" in text


def test_api_reference_and_guides_are_built(site):
    api = {
        "lightning_dropout": "DropoutConfigError",
        "variants": "DropoutVariant",
        "plan": "DropoutPlan",
        "injection": "Rule",
        "callback": "DropoutInjector",
        "schedules": "EarlyDropout",
        "mc": "mc_predict",
        "tune": "StudyConfig",
        "monitor": "GapMonitor",
    }
    for page, name in api.items():
        assert f'id="lightning_dropout.{page + "." if page != "lightning_dropout" else ""}{name}"' in _page(
            site, f"reference/api/{page}"
        ), f"{name} not documented on the {page} API page"
    for page in (
        "getting-started/callback",
        "getting-started/tune",
        "getting-started/tensorboard",
        "getting-started/scale",
        "guide",
        "usage",
        "tuning",
        "architecture",
    ):
        _page(site, page)
    # the quickstart config is included from the repository, not copied
    assert "lightning_dropout.zoo.MLP" in _text(_page(site, "getting-started/tune"))
