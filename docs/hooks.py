"""MkDocs hooks: pages and figures generated from the code at build time, so nothing goes stale.

* ``assets/variants/<name>.png``: the mask of every registered variant, drawn by running the real module (in a
  child process, ``python docs/hooks.py --figures DIR``, that runs while the rest of the build goes on);
* ``reference/config.md``: the YAML reference, from the parser that reads the config file
  (:class:`lightning_dropout.config.ConfigCLI`) and the dataclasses of its ``study:`` and ``dropout:`` sections;
* ``reference/cli.md``: the output of ``lightning-dropout --help`` and of every subcommand's ``--help``;
* ``reference/variants.md`` (hand-written) is checked to have one section per registered variant, each
  followed by the variant's class and signature.

``mkdocs build --strict`` (from any directory, ``-f path/to/mkdocs.yml``); nothing is written into ``docs/``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import yaml
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package, also when it is not pip-installed
    sys.path.insert(0, str(ROOT))

VARIANTS_PAGE = "reference/variants.md"
FIGURE_DIR = "assets/variants"

# -- variant figures ---------------------------------------------------------------------------------------------

# For each variant: rate, constructor parameters, the input it is shown on, and how to draw the output.
# ``view`` turns the module's output into the 2-D array drawn; the axis labels name its rows and columns.
_FIGURES: dict[str, dict[str, Any]] = {
    "standard": dict(p=0.3, shape=(8, 32), rows="sample", cols="feature"),
    "spatial": dict(p=0.3, shape=(1, 16, 32), view=lambda y: y[0], rows="channel", cols="position (L)"),
    "variational": dict(
        p=0.3,
        params={"batch_first": True},
        shape=(1, 32, 16),
        view=lambda y: y[0].T,
        rows="unit",
        cols="time step",
    ),
    "weight": dict(p=0.3, shape=(8, 32), rows="output unit (weight row)", cols="input unit (weight column)"),
    "alpha": dict(p=0.3, shape=(8, 32), rows="sample", cols="feature"),
    "feature_alpha": dict(p=0.3, shape=(1, 16, 32), view=lambda y: y[0], rows="channel", cols="position (L)"),
    "gaussian": dict(p=0.3, shape=(8, 32), rows="sample", cols="feature"),
    "dropblock": dict(
        p=0.2,
        params={"block_size": 5},
        shape=(1, 1, 32, 32),
        view=lambda y: y[0, 0],
        rows="H",
        cols="W",
    ),
    "droppath": dict(p=0.3, shape=(16, 32), rows="sample", cols="feature"),
    "attention": dict(
        p=0.3,
        shape=(1, 1, 16, 16),
        input="attention",
        view=lambda y: y[0, 0],
        rows="query",
        cols="key",
    ),
    "concrete": dict(p=0.3, shape=(8, 32), rows="sample", cols="feature"),
}


def variant_figure(name: str) -> bytes:
    """PNG of the training-mode output of variant ``name`` (the real module) on an all-ones input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lightning_dropout.variants import build_variant

    if name not in _FIGURES:
        raise PluginError(f"docs/hooks.py: variant {name!r} has no figure recipe in _FIGURES; add one.")
    spec = _FIGURES[name]
    module = build_variant(name, spec["p"], **spec.get("params", {})).train()
    module.generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # fixed, one per variant
    module.track = True
    torch.manual_seed(0)

    def ones(shape: tuple[int, ...]) -> Any:
        if spec.get("input") == "attention":  # uniform attention rows, each summing to 1
            return torch.full(shape, 1.0 / shape[-1])
        return torch.ones(shape)

    shape = tuple(spec["shape"])
    scale = shape[-1] if spec.get("input") == "attention" else 1.0
    with torch.no_grad():
        module(ones((shape[0] * 256, *shape[1:])))  # the fraction dropped, measured over 256 such inputs
        fraction = module.drop_fraction
        y = module(ones(shape)) * scale
    image = spec.get("view", lambda t: t)(y).numpy()

    fig, ax = plt.subplots(figsize=(7.0, 2.9 if image.shape[0] <= 8 else 4.2), dpi=100)
    values = sorted({round(float(v), 4) for v in image.ravel()})
    im = ax.imshow(image, cmap="viridis", interpolation="nearest", aspect="auto")
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    if len(values) <= 3:
        cbar.set_ticks(values)
    what = "output on all-ones input" if spec.get("input") != "attention" else "multiplier of each weight"
    measured = (
        f"fraction dropped over 256 such inputs: {float(fraction):.3f}; "
        if fraction is not None and module.drops_units and module.schedulable  # concrete records its rate
        else ""
    )
    label = "initial " if name == "concrete" else ""
    ax.set_title(
        f"{name}, {label}p={spec['p']:g}, training mode: {what}\n{measured}eval mode: identity", fontsize=9
    )
    ax.set_ylabel(spec["rows"], fontsize=8)
    ax.set_xlabel(spec["cols"], fontsize=8)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.09, right=0.88, bottom=0.16 if image.shape[0] <= 8 else 0.11, top=0.84)
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    plt.close(fig)
    return out.getvalue()


# -- YAML reference -------------------------------------------------------------------------------------------------


def _arg_docs(cls: type) -> dict[str, str]:
    """``Args:`` descriptions of a Google-style class docstring, by name (griffe's parser, as mkdocstrings)."""
    import griffe

    docstring = griffe.Docstring(inspect.cleandoc(cls.__doc__ or ""), lineno=1)
    sections = docstring.parse("google", warnings=False)
    out = {}
    for section in sections:
        if section.kind is griffe.DocstringSectionKind.parameters:
            for param in section.value:
                out[param.name] = " ".join(param.description.split())
    return out


def _summary(cls: type) -> str:
    """The docstring without its ``Args:`` section."""
    text = inspect.cleandoc(cls.__doc__ or "")
    return _md(text.split("\n\nArgs:")[0].strip())


def _md(text: str) -> str:
    """Docstring text to Markdown: RST double backticks and ``:role:`~x.y.Z``` references become code."""
    text = re.sub(r":(?:class|func|meth|mod|data|attr|obj):`~?([^`]+)`", lambda m: f"`{m.group(1)}`", text)
    return text.replace("``", "`")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "*required*"
    value = value.serialize() if hasattr(value, "serialize") else value  # a ClassSpec: the mapping as written
    dumped = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
    return f"`{dumped}`"


# Fields whose class docstring has no ``Args:`` entry for them.
_FIELD_DOCS = {("DropoutSpace", "groups"): "the groups of sites to search, each described below."}


def _field_table(cls: type, prefix: str) -> str:
    docs = {**{f: d for (c, f), d in _FIELD_DOCS.items() if c == cls.__name__}, **_arg_docs(cls)}
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.name not in docs:
            raise PluginError(
                f"docs/hooks.py: {cls.__name__}.{field.name} has no `Args:` entry in its docstring."
            )
        kind = str(field.type).replace("ClassSpec", "{class_path, init_args}")
        rows.append(f"| `{prefix}{field.name}` | `{kind}` | {_default(field)} | {_md(docs[field.name])} |")
    return "\n".join(rows)


class _ParserGrabbed(Exception):
    def __init__(self, parser: Any) -> None:
        self.parser = parser


def config_parser() -> Any:
    """The jsonargparse parser :class:`ConfigCLI` reads config files with (built, nothing parsed)."""
    from lightning_dropout.config import ConfigCLI, quiet_lightning
    from lightning_dropout.tune.config import CONFIG_SECTIONS

    class Grab(ConfigCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _ParserGrabbed(parser)

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        with quiet_lightning():
            Grab([], sections=CONFIG_SECTIONS)
    except _ParserGrabbed as grabbed:
        return grabbed.parser
    finally:
        sys.argv = argv
    raise PluginError("docs/hooks.py: ConfigCLI did not build a parser")


# LightningCLI's own sections, whose parser help is generic ("Path to a configuration file").
_LIGHTNING_KEYS = {
    "trainer": "`lightning.Trainer` arguments (`max_epochs`, `devices`, `strategy`, `callbacks`, `logger`, ...)",
    "model": "the `LightningModule`: `class_path` and `init_args`",
    "data": "the `LightningDataModule`: `class_path` and `init_args`",
    "optimizer": "optional optimizer when the module's `configure_optimizers` does not build one",
    "lr_scheduler": "optional learning-rate scheduler, likewise",
}


def _top_level_keys(parser: Any) -> list[tuple[str, str]]:
    """``(key, meaning)`` for every top-level key of the parser, in the parser's order."""
    groups = {g.dest: g.title for g in parser._action_groups if getattr(g, "dest", None)}
    keys: dict[str, str] = {}
    for action in parser._actions:
        dest = getattr(action, "dest", None)
        if not isinstance(dest, str) or dest in ("help", "config", "print_config") or dest.startswith("__"):
            continue
        top = dest.split(".")[0]
        if top not in keys:
            text = _LIGHTNING_KEYS.get(top) or groups.get(top) or str(action.help or "")
            keys[top] = " ".join(text.split())
    return list(keys.items())


def config_reference(parser: Any) -> str:
    from lightning_dropout.tune.config import DropoutSpace, StudyConfig
    from lightning_dropout.tune.space import SearchGroup

    known = {a.dest for a in parser._actions if isinstance(getattr(a, "dest", None), str)}
    missing = [f"study.{f.name}" for f in dataclasses.fields(StudyConfig) if f"study.{f.name}" not in known]
    if missing:
        raise PluginError(f"docs/hooks.py: the config parser lacks {missing}")
    top = "\n".join(
        f"| `{key}` | {_md(text.removesuffix('.')) or '-'} |" for key, text in _top_level_keys(parser)
    )
    quickstart = (ROOT / "configs" / "quickstart.yaml").read_text()
    return f"""# YAML configuration reference

*Generated at build time from the parser that reads the file
(`lightning_dropout.config.ConfigCLI`, a `LightningCLI`) and from the docstrings and
defaults of [`StudyConfig`][lightning_dropout.tune.config.StudyConfig],
[`DropoutSpace`][lightning_dropout.tune.config.DropoutSpace] and
[`SearchGroup`][lightning_dropout.tune.space.SearchGroup].*

One file serves every command (`fit`, `validate`, `test`, `predict`, `describe`, `tune`). It is a
LightningCLI config (`model`, `data` and `trainer` with `class_path`/`init_args`) plus the tuner's two
sections. Everything is validated when the file is loaded: an unknown key or a bad value stops the command with
one line naming the key, exit status 2. Any key can also be given on the command line
(`--study.n_trials=40`, `--trainer.max_epochs=5`); `lightning-dropout fit FILE --print_config`
prints the whole resolved file, defaults included.

## Top-level keys

| key | meaning |
|---|---|
{top}

`model`, `data`, `trainer`, `optimizer` and `lr_scheduler` follow LightningCLI; see the
[LightningCLI documentation](https://lightning.ai/docs/pytorch/stable/cli/lightning_cli.html).
A `DropoutInjector` goes in `trainer.callbacks` (see [Attach the callback](../getting-started/callback.md)).

## `study:`

{_summary(StudyConfig)}

{_field_table(StudyConfig, "study.")}

`sampler` and `pruner` follow the LightningCLI convention: `class_path` names any class of
`optuna.samplers` / `optuna.pruners`, or your own importable subclass of `BaseSampler` / `BasePruner`
(`mypkg.MySampler`), and `init_args` its keyword arguments, e.g.
`{{class_path: optuna.samplers.TPESampler, init_args: {{multivariate: true}}}}`; a bare class name
(`TPESampler`) is looked up in Optuna. A wrong name fails at load time with the nearest choices; the former
`{{name: ..., args: ...}}` form fails with the `class_path` form to write instead.

## `dropout:`

{_summary(DropoutSpace)}

{_field_table(DropoutSpace, "dropout.")}

### `dropout.groups[]`

{_summary(SearchGroup)}

{_field_table(SearchGroup, "")}

## Example

`configs/quickstart.yaml`, the study of [Tune from YAML](../getting-started/tune.md):

```yaml
{quickstart.rstrip()}
```
"""


# -- CLI reference --------------------------------------------------------------------------------------------------


def _help(args: list[str]) -> str:
    from lightning_dropout.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        main(args)
    text = out.getvalue() or err.getvalue()
    return text.rstrip() + "\n"


def cli_reference() -> str:
    from lightning_dropout import cli

    commands = list(cli._VERBS)
    top = _help(["--help"])
    helps: dict[str, list[str]] = {}  # help text -> commands printing it
    for command in commands:
        helps.setdefault(_help([command, "--help"]), []).append(command)
    doc = inspect.getdoc(cli) or ""
    parts = [
        "# Command-line reference",
        "",
        "*Generated at build time by running `lightning-dropout --help` and `lightning-dropout COMMAND --help` "
        "for every command of `lightning_dropout/cli.py`.*",
        "",
        _md(doc.split("\n\n", 1)[1] if "\n\n" in doc else doc),
        "",
        "## `lightning-dropout --help`",
        "",
        "```text",
        top.rstrip(),
        "```",
    ]
    for text, names in helps.items():
        title = ", ".join(f"`{n}`" for n in names)
        parts += ["", f"## {title}", ""]
        if len(names) > 1:
            parts += [
                "These commands read the same config parser (the keys of the "
                "[YAML reference](config.md)); every key is also a `--key=value` option.",
                "",
            ]
        shown = " | ".join(names) if len(names) > 1 else names[0]
        parts += [f"`lightning-dropout {shown} --help`:", "", "```text", text.rstrip(), "```"]
    return "\n".join(parts) + "\n"


# -- mkdocs events --------------------------------------------------------------------------------------------------


# The figures are drawn in a child process started in ``on_config`` (it imports torch and matplotlib), while this
# process imports Lightning to build the config parser: the two halves of the build overlap.
_FIGURE_JOB: dict[str, Any] = {}


def _start_figures() -> None:
    _stop_figures()
    out = tempfile.mkdtemp(prefix="ld-docs-figures-")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--figures", out],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _FIGURE_JOB.update(proc=proc, dir=out)


def _stop_figures() -> None:
    proc, out = _FIGURE_JOB.pop("proc", None), _FIGURE_JOB.pop("dir", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)


atexit.register(_stop_figures)


def _figures(names: list[str]) -> dict[str, bytes]:
    """Wait for the figure process; the PNG of every variant in ``names``."""
    proc, out = _FIGURE_JOB["proc"], Path(_FIGURE_JOB["dir"])
    try:
        _, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise PluginError(f"docs/hooks.py --figures failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        missing = [n for n in names if not (out / f"{n}.png").is_file()]
        if missing:
            raise PluginError(f"docs/hooks.py --figures drew no figure for {missing}")
        return {n: (out / f"{n}.png").read_bytes() for n in names}
    finally:
        _stop_figures()


def on_config(config: Any) -> Any:
    # included files (``--8<-- "configs/quickstart.yaml"``) are relative to the repository, wherever mkdocs runs
    config.mdx_configs.setdefault("pymdownx.snippets", {})["base_path"] = [str(ROOT)]
    _start_figures()
    return config


def on_files(files: Files, config: Any) -> Files:
    os.environ["COLUMNS"] = "110"  # argparse wraps --help to the terminal width: make it fixed
    files.append(File.generated(config, "reference/config.md", content=config_reference(config_parser())))
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    from lightning_dropout.variants import VARIANTS

    for name, png in _figures(sorted(VARIANTS)).items():
        files.append(File.generated(config, f"{FIGURE_DIR}/{name}.png", content=png))
    return files


def _signature(cls: type) -> str:
    sig = inspect.signature(cls.__init__)
    params = [p for n, p in sig.parameters.items() if n != "self"]
    shown = [p.name + ("" if p.default is p.empty else f"={p.default!r}") for p in params]
    return f"{cls.__name__}({', '.join(shown)})"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri != VARIANTS_PAGE:
        return markdown
    from lightning_dropout.variants import VARIANTS

    headings = re.findall(r"^## `([\w]+)`", markdown, flags=re.MULTILINE)
    missing = sorted(set(VARIANTS) - set(headings))
    unknown = sorted(set(headings) - set(VARIANTS))
    if missing or unknown:
        raise PluginError(
            f"{VARIANTS_PAGE} must have one '## `name`' section per registered variant: "
            f"missing {missing}, not registered {unknown}."
        )

    def add_signature(match: re.Match) -> str:
        cls = VARIANTS[match.group(1)]
        path = f"lightning_dropout.variants.{cls.__name__}"
        figure = f"../{FIGURE_DIR}/{match.group(1)}.png"
        return (
            f"{match.group(0)}\n\n[`{path}`][{path}] `{_signature(cls)}`\n\n"
            f"![{match.group(1)}: its output on an all-ones input in training mode]({figure})\n"
        )

    return re.sub(r"^## `([\w]+)`.*$", add_signature, markdown, flags=re.MULTILINE)


def _main(argv: list[str]) -> int:
    """``python docs/hooks.py --figures DIR``: write ``DIR/<variant>.png`` for every registered variant."""
    if len(argv) != 2 or argv[0] != "--figures":
        sys.stderr.write("usage: python docs/hooks.py --figures DIR\n")
        return 2
    from lightning_dropout.variants import VARIANTS

    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(VARIANTS):
        (out / f"{name}.png").write_bytes(variant_figure(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
