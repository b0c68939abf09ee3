"""The ``lightning-dropout`` command line (the only module that reads argv).

Commands:

* ``fit | validate | test | predict --config CONFIG.yaml [overrides] [--ckpt_path CKPT]``: a LightningCLI
  run of that Trainer method. Put a ``DropoutInjector`` in ``trainer.callbacks`` (see ``configs/``); any
  existing LightningCLI config (``model``/``data``/``trainer`` with ``class_path``/``init_args``) works.
* ``describe --config CONFIG.yaml``: build the model, resolve the injector's rules and print every dropout
  site (module, variant, rate, the shape it sees) without training; on a tuning config, preview the search
  space (each group, the sites it matches, its search dimensions). ``describe CONFIG --existing`` lists the
  dropout the model has of its own (modules, rate attributes, attention and RNN dropout) instead.
* ``variants``: list the registered variants.
* ``tune CONFIG [overrides]``: run (or resume, or join) the Optuna study of a tuning config (``study:`` and
  ``dropout:`` sections next to ``model``/``data``/``trainer``); prints the progress, the re-run table, and
  writes the winning plan to ``<run_dir>/<study>/best_plan.yaml``.
* ``best STUDY|CONFIG [--storage URL] [--out PLAN.yaml]``: print and write a finished study's best plan (the
  tuning config names the study and its storage).
* ``report STUDY|CONFIG [--storage URL] [--out FILE.html]``: write a static HTML report of a study (figures, the best
  plan, the re-run table against the baselines, every trial); opens in a browser with no server.
* ``fit CONFIG --plan PLAN.yaml``: retrain with a plan (and the searched values written beside it), then report
  validation metrics, and test ones when the model defines a test step.

``CONFIG`` may be given positionally or as ``--config CONFIG``.

User errors (a bad config, a rule that matches nothing) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# argv handling, `--help` and `variants` stay cheap: Lightning, jsonargparse and Optuna load in the commands
from lightning_dropout.errors import DropoutConfigError, closest, summarize, unwritable
from lightning_dropout.redaction import redact, remember_urls

if TYPE_CHECKING:
    from lightning_dropout.config import ConfigCLI

__all__ = ["main"]

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _lightning_help(command: str) -> str:
    """The short help of a Lightning command (LightningCLI's complete one needs Lightning: ``--help-all``)."""
    after_fit = (
        "                    after fit, also validate, and test when the model defines a test_step\n"
        if command == "fit"
        else ""
    )
    ckpt = "resume" if command == "fit" else "evaluate"
    return (
        f"usage: lightning-dropout {command} CONFIG.yaml [--plan PLAN.yaml] [--ckpt_path CKPT] [overrides]\n"
        f"Lightning's `{command}` on a LightningCLI config (model/data/trainer with class_path/init_args).\n"
        "  CONFIG.yaml, --config CONFIG.yaml  the config (`study:`/`dropout:`/`search:` sections are ignored)\n"
        "  --plan PLAN.yaml  apply a dropout plan (from `tune` or `best`), replacing an injector the config\n"
        "                    lists, and the searched values written beside it (X_values.yaml)\n"
        f"{after_fit}"
        f"  --ckpt_path CKPT  checkpoint to {ckpt}\n"
        "  --trainer.KEY=V, --model.init_args.KEY=V, --data.init_args.KEY=V  override any key of the config\n"
        "  --print_config    print the resolved config (defaults included) and exit\n"
        f"Every Trainer, model and data option (LightningCLI's full help): lightning-dropout {command} --help-all"
    )


_TUNE_HELP = (
    "usage: lightning-dropout tune CONFIG.yaml [--budget B] [--workers N|auto] [--n_trials N] [--storage URL]\n"
    "                                          [overrides]\n"
    "Run, resume or join the Optuna study of a tuning config (model/data/trainer plus `study:` and\n"
    "`dropout:` sections); prints the re-run table, writes <run_dir>/<study>/best_plan.yaml (and\n"
    "best_values.yaml, the winner's `search:` values) and ends with the command that trains the winner.\n"
    "  CONFIG.yaml, --config CONFIG.yaml  the tuning config\n"
    "  --budget B       the study's compute in trainings of the model (= --study.budget=B; default 10)\n"
    "  --workers N      worker processes sharing the study on this machine (= --study.workers=N); each gets\n"
    "                   its own trainer.devices GPUs of study.devices; auto: as many as fit\n"
    "  --n_trials N     finished trials the study should reach (= --study.n_trials=N)\n"
    "  --storage URL    sqlite:///..., postgresql://..., journal:PATH (= --study.storage=URL); default:\n"
    "                   the config's study.storage, else $LIGHTNING_DROPOUT_STORAGE, else SQLite in run_dir\n"
    "  --study.KEY=V, --dropout.groups=[...], --trainer.KEY=V, --model.init_args.KEY=V, --data...\n"
    "                   override any key of the config\n"
    "  --print_config   print the resolved config (defaults included) and exit\n"
    "Preview the search space first: lightning-dropout describe CONFIG.yaml"
)

_DESCRIBE_HELP = (
    "usage: lightning-dropout describe CONFIG.yaml [--existing] [overrides]\n"
    "Build the model without training and print:\n"
    "  - for a tuning config (`dropout.groups`): each search group, the sites it matches in the model and\n"
    "    its search dimensions (the Optuna parameters and their domains), then the values its `search:`\n"
    "    section samples beside dropout;\n"
    "  - for a config with a DropoutInjector in trainer.callbacks: every dropout site it creates (module,\n"
    "    variant, rate, the shape it sees).\n"
    "  CONFIG.yaml, --config CONFIG.yaml  the config\n"
    "  --existing       list instead the dropout the model already has (dropout modules, rate attributes\n"
    "                   applied functionally, attention and RNN dropout): the site `replace: true` makes\n"
    "                   of each, its rate and kind (`bypassed`: a fused attention kernel reads its `.p`,\n"
    "                   so only variant standard acts there); any config with a model will do\n"
    "  --KEY=V          override any key of the config (--model.init_args.hidden=64, ...)"
)

_VARIANTS_HELP = (
    "usage: lightning-dropout variants\n"
    "List the dropout variants (the names `variant:` takes in rules, plans and search groups)."
)


def _config_args(rest: list[str]) -> list[str]:
    """Accept the config positionally (``tune study.yaml``) as well as ``--config study.yaml``."""
    if rest and not rest[0].startswith("-"):
        return ["--config", rest[0], *rest[1:]]
    return rest


def _load(args: list[str], instantiate: bool = True) -> ConfigCLI:
    """The config, with the tuner's ``study:`` and ``dropout:`` sections known to every command."""
    from lightning_dropout.config import load_config
    from lightning_dropout.tune.config import CONFIG_SECTIONS

    return load_config(args, instantiate=instantiate, sections=CONFIG_SECTIONS)


def _lightning(command: str, rest: list[str]) -> int:
    from lightning_dropout.callback import DropoutInjector

    cli = _load(rest, instantiate=False)
    plan = _plan_path(cli.config, rest)
    values: dict[str, Any] = {}
    if plan:  # the winner's searched values, written beside its plan by `tune` / `best --out`
        from lightning_dropout.tune.retrain import apply_values

        source, values, kept = apply_values(plan, cli.config, rest, command)
        for key, value in values.items():
            sys.stderr.write(
                f"lightning-dropout: {key}={value!r} (the winner's searched value, from {source})\n"
            )
        for key, value in kept.items():
            sys.stderr.write(
                f"lightning-dropout: {key}: the command line's value, not the winner's {value!r}\n"
            )
    # `--plan` replaces a DropoutInjector the config lists (two would stack, and share a checkpoint key)
    cli.fresh(
        [DropoutInjector(plan=plan)] if plan else [],
        replacing=(DropoutInjector,) if plan else (),
        values=values,
    )
    ckpt = cli.config.get("ckpt_path")
    getattr(cli.trainer, command)(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    if command == "fit" and plan:
        metrics: dict[str, float] = {}
        for stage in ("validate", "test"):
            missing = _missing_step(stage, cli.model, cli.datamodule)
            if missing:
                sys.stderr.write(f"lightning-dropout: {stage} skipped after fit: {missing}\n")
                continue
            for results in getattr(cli.trainer, stage)(cli.model, datamodule=cli.datamodule, verbose=False):
                metrics.update({k: float(v) for k, v in results.items()})
        width = max(map(len, metrics), default=0)
        sys.stdout.write("".join(f"{k.ljust(width)}  {v:.4f}\n" for k, v in sorted(metrics.items())))
    return 0


def _plan_path(config: Any, rest: list[str]) -> str | None:
    """The ``plan`` of the command: ``--plan PATH`` as given (relative to the current folder), or a config's
    ``plan:`` relative to that config file's folder (as LightningCLI resolves paths in a config)."""
    plan: str | None = config.get("plan")
    if not plan or os.path.isabs(plan) or any(a == "--plan" or a.startswith("--plan=") for a in rest):
        return plan
    import yaml

    for file in reversed([str(f) for f in config.get("config") or [] if f is not None]):
        try:
            data = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and data.get("plan") == plan:
            return str(Path(file).parent / plan)
    return str(plan)


def _missing_step(stage: str, model: Any, datamodule: Any) -> str | None:
    """Why ``stage`` (``validate``/``test``) cannot run after fit: the module defines no ``validation_step`` /
    ``test_step``, or neither the datamodule nor the module gives its dataloader; ``None`` when it can."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    step, loader = (
        ("validation_step", "val_dataloader") if stage == "validate" else ("test_step", "test_dataloader")
    )
    if not is_overridden(step, model):
        return f"the model defines no {step}"
    if not (is_overridden(loader, model) or (datamodule is not None and is_overridden(loader, datamodule))):
        return f"neither the datamodule nor the model defines {loader}"
    return None


def _tune(rest: list[str]) -> int:
    from lightning_dropout.tune.study import tune

    tune(_study_shortcuts(rest))
    return 0


_SHORTCUTS = ("--budget", "--workers", "--n_trials", "--storage")


def _study_shortcuts(args: list[str]) -> list[str]:
    """``--workers 2`` / ``--n_trials 40`` / ``--storage URL`` stand for ``--study.<name>=...``."""
    out, i = [], 0
    while i < len(args):
        flag, _, value = args[i].partition("=")
        if flag in _SHORTCUTS:
            if not value:
                if i + 1 >= len(args):
                    raise DropoutConfigError(f"`{flag}` needs a value, but got none.")
                i, value = i + 1, args[i + 1]
            out.append(f"--study.{flag[2:]}={value}")
        else:
            out.append(args[i])
        i += 1
    return out


def _study_parser(command: str, out_help: str) -> Any:
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # one line, the nearest option, no usage block
            unknown = re.search(r"unrecognized arguments: (\S+)", message)
            if unknown:
                options = [o for a in self._actions for o in a.option_strings]
                raise DropoutConfigError(
                    f"`{self.prog}` takes the options {options}, but got {unknown.group(1)!r}; nearest: "
                    f"{closest(unknown.group(1), options)}."
                )
            raise DropoutConfigError(f"`{self.prog}`: {message} (usage: {self.format_usage().strip()[7:]}).")

    parser = Parser(prog=f"lightning-dropout {command}", exit_on_error=False)
    parser.add_argument(
        "study",
        nargs="?",
        default=None,
        help="the study name (`study.name` of its config), or the tuning config (a .yaml file) itself: its "
        "`study.name` and `study.storage` (default $LIGHTNING_DROPOUT_STORAGE, else "
        "sqlite:///<study.run_dir>/<study.name>/study.db) are used",
    )
    parser.add_argument("-c", "--config", default=None, help="the tuning config (same as giving it as STUDY)")
    parser.add_argument(
        "--storage",
        default=None,
        help="the study's storage URL; default: the config's, else $LIGHTNING_DROPOUT_STORAGE, else "
        "sqlite:///runs/STUDY/study.db",
    )
    parser.add_argument("--out", default=None, help=out_help)
    return parser


def _is_config(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml")) or os.path.isfile(arg)


def _study_location(ns: Any) -> tuple[str, str, str]:
    """``(study name, storage URL, run directory)`` from ``best``/``report``'s arguments: a study name, a tuning
    config (positional or ``--config``), or both (the name then overrides the config's)."""
    from lightning_dropout.tune.config import resolve_storage  # after parsing: `--help` stays cheap

    name, config = ns.study, ns.config
    if config is None and name is not None and _is_config(name):
        name, config = None, name
    if config is None:
        if name is None:
            raise DropoutConfigError(
                "`best` and `report` need a study name or a tuning config (`lightning-dropout best CONFIG.yaml`), "
                "but got neither."
            )
        return name, resolve_storage(ns.storage, name), "runs"
    study = _load(["--config", config], instantiate=False).config["study"]
    name = name or str(study["name"])
    run_dir = str(study["run_dir"])
    return name, resolve_storage(ns.storage or study["storage"], name, run_dir), run_dir


def _best(rest: list[str]) -> int:
    parser = _study_parser(
        "best",
        "also write the plan to this YAML file, and the winner's searched values beside it (X.yaml: "
        "X_values.yaml; default: print only)",
    )
    parser.add_argument(
        "--config-out",
        default=None,
        help="also write the whole winning config (its searched values set, `plan:` the plan file): "
        "`lightning-dropout fit` on it trains the winner",
    )
    ns = parser.parse_args(rest)
    from lightning_dropout.tune.records import open_study, winner, winning_config  # `best --help` stays cheap
    from lightning_dropout.tune.retrain import save_values, searched_values
    from lightning_dropout.tune.study import plan_summary

    name, storage, _ = _study_location(ns)
    study = open_study(name, storage)
    plan, label = winner(study)
    values = searched_values(study)
    sys.stdout.write(f"# best plan of {name}: {label}: {plan_summary(plan)}\n{plan.to_yaml()}")
    for key, value in values.items():  # YAML comments: the output stays a plan
        sys.stdout.write(f"# searched value of the winner: {key}: {value!r}\n")
    if ns.out:
        plan.save(ns.out)
        saved = save_values(values, ns.out, f"the winner of study {name} ({label})")
        if saved is not None:
            sys.stdout.write(f"# searched values written to {saved} (`fit --plan {ns.out}` sets them)\n")
    if ns.config_out:
        config = Path(ns.config_out)
        plan_path = Path(ns.out) if ns.out else config.with_name(f"{config.stem}_plan.yaml")
        if not ns.out:
            plan.save(plan_path)
        config.parent.mkdir(parents=True, exist_ok=True)
        # relative to the config file itself, where `fit` resolves it: the two files move together
        relative = os.path.relpath(plan_path.resolve(), config.parent.resolve())
        config.write_text(winning_config(study, relative))
        sys.stdout.write(f"# winning config written to {config} (plan: {plan_path})\n")
    return 0


def _report(rest: list[str]) -> int:
    ns = _study_parser("report", "the HTML file to write (default: <run_dir>/STUDY/report.html)").parse_args(
        rest
    )
    from lightning_dropout.tune.records import open_study
    from lightning_dropout.tune.report import write_report

    name, storage, run_dir = _study_location(ns)
    study = open_study(name, storage)
    path = write_report(study, ns.out or f"{run_dir}/{name}/report.html", storage=redact(storage))
    sys.stdout.write(f"report written to {path}\n")
    return 0


def _fail(message: str, config: str | None = None) -> int:
    """Print one line on stderr: the house-style sentence buried in the message if there is one, after the
    config file it comes from; passwords redacted."""
    if config and message.startswith(f"{config}: "):
        message = message[len(config) + 2 :]
    line = summarize(message)
    if config and config not in line:
        line = f"{config}: {line}"
    sys.stderr.write(f"lightning-dropout: error: {redact(line)[:800]}\n")
    return 2


def _describe(args: list[str], existing: bool = False) -> int:
    from lightning_dropout.callback import DropoutInjector
    from lightning_dropout.config import quiet_lightning
    from lightning_dropout.injection import describe, existing_dropout, format_sites

    cli = _load(args)
    model = cli.model
    example = getattr(model, "example_input_array", None)
    if existing:  # the model's own dropout, before any injector touches it
        with quiet_lightning():
            rows = existing_dropout(model, example)
        found = format_sites(rows) if rows else f"{type(model).__name__} has no dropout of its own"
        sys.stdout.write(found + "\n")
        return 0
    injectors = [c for c in cli.trainer.callbacks if isinstance(c, DropoutInjector)]  # type: ignore[attr-defined]
    space = cli.config_init.get("dropout")
    groups = list(getattr(space, "groups", None) or [])
    plan = _plan_path(cli.config, args)
    if plan:  # what `fit --plan` would train: the plan's sites, in place of the config's injector and search
        injectors, groups = [DropoutInjector(plan=plan)], []
    if not injectors and not groups:
        return _fail(
            "the config must list a lightning_dropout.callback.DropoutInjector in trainer.callbacks or search "
            "groups in `dropout.groups` (a tuning config), but it has neither; `describe CONFIG --existing` "
            "lists the dropout the model already has."
        )
    if groups:  # a tuning config: preview what the search may put where, and what else it samples
        from lightning_dropout.tune.search import format_search, parse_search
        from lightning_dropout.tune.space import format_space

        with quiet_lightning():
            sys.stdout.write(format_space(groups, model, example) + "\n")
        searched = parse_search(cli.config.get("search"), cli.config)
        if searched:
            sys.stdout.write(format_search(searched) + "\n")
    if injectors:
        with quiet_lightning():
            for injector in injectors:
                injector.inject(model)
        if groups:
            sys.stdout.write("\nthe config's DropoutInjector sites:\n")
        sys.stdout.write(format_sites(describe(model, example, existing=False)) + "\n")
    return 0


def _variants(rest: list[str]) -> int:
    from lightning_dropout.catalog import BUILTIN_VARIANTS  # torch-free: the registry's names and summaries

    if rest:
        raise DropoutConfigError(
            f"`variants` takes no arguments (it lists every variant), but got {rest}; the variants: "
            f"{sorted(BUILTIN_VARIANTS)}."
        )

    width = max(map(len, BUILTIN_VARIANTS))
    for name in sorted(BUILTIN_VARIANTS):
        sys.stdout.write(f"{name.ljust(width)}  {BUILTIN_VARIANTS[name]}\n")
    return 0


@dataclass(frozen=True)
class _Verb:
    """One command: what ``--help`` lists for it, what ``COMMAND --help`` prints, what runs it (with the
    arguments after the command) and whether it reads a config (whose path then prefixes its errors). A new
    command is one entry of ``_VERBS``."""

    synopsis: str  # `tune CONFIG`, as the usage lists it
    summary: str  # the usage's lines for it
    run: Callable[[list[str]], int]
    takes_config: bool = False
    help: str | None = None  # `COMMAND --help`; None: the command's own parser prints it


def _lightning_verb(command: str) -> _Verb:
    return _Verb(
        "fit|validate|test|predict",
        "run LightningCLI (put a DropoutInjector in trainer.callbacks);\n"
        "`fit CONFIG --plan PLAN.yaml` retrains with a plan and reports val/test metrics",
        lambda rest: _lightning(command, _config_args(rest)),
        takes_config=True,
        help=_lightning_help(command),
    )


_VERBS: dict[str, _Verb] = {
    **{command: _lightning_verb(command) for command in _LIGHTNING_COMMANDS},
    "tune": _Verb(
        "tune CONFIG",
        "run or resume the Optuna study of a tuning config (study: and dropout: sections);\n"
        "--budget B, --workers N, --n_trials N, --storage URL stand for\n--study.budget=B etc.",
        lambda rest: _tune(_config_args(rest)),
        takes_config=True,
        help=_TUNE_HELP,
    ),
    "best": _Verb(
        "best STUDY|CONFIG",
        "print and write the best plan of a study [--storage URL] [--out PLAN.yaml]",
        _best,
    ),
    "report": _Verb(
        "report STUDY|CONFIG",
        "write a static HTML report of a study [--storage URL] [--out FILE.html]",
        _report,
    ),
    "describe": _Verb(
        "describe CONFIG",
        "print the dropout sites the config's DropoutInjector would create, or\n"
        "preview a tuning config's search space (groups, sites, dimensions);\n"
        "--existing: list the dropout the model already has",
        lambda rest: _describe(
            _config_args([a for a in rest if a != "--existing"]), existing="--existing" in rest
        ),
        takes_config=True,
        help=_DESCRIBE_HELP,
    ),
    "variants": _Verb("variants", "list the dropout variants", _variants, help=_VARIANTS_HELP),
}


def _usage() -> str:
    """``lightning-dropout --help``: every command of ``_VERBS`` (those with one synopsis listed once)."""
    rows: dict[str, str] = {}
    for verb in _VERBS.values():
        rows.setdefault(verb.synopsis, verb.summary)
    rows["--version"] = "print the version"
    width = max(map(len, rows)) + 1
    lines = [f"usage: lightning-dropout {{{','.join(_VERBS)}}} [CONFIG.yaml] [overrides]"]
    for synopsis, summary in rows.items():
        first, *more = summary.split("\n")
        lines.append(f"  {synopsis.ljust(width)} {first}")
        lines += [f"  {' ' * width} {line}" for line in more]
    lines.append(
        "Run `lightning-dropout COMMAND --help` for a command's options (`fit --help`: every LightningCLI option)."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-dropout`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Lightning 2.6 on torch 2.13 warns about its own pytree use on every fit: noise for our users.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(_usage() + "\n")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from importlib.metadata import version

        sys.stdout.write(f"lightning-dropout {version('lightning-dropout')}\n")
        return 0
    command, rest = args[0], args[1:]
    if command in _LIGHTNING_COMMANDS and "--help-all" in rest:  # LightningCLI's own, complete help
        rest = ["--help" if a == "--help-all" else a for a in rest]
    elif command in _VERBS and _VERBS[command].help and any(a in ("-h", "--help") for a in rest):
        sys.stdout.write(f"{_VERBS[command].help}\n")
        return 0
    _own_code_importable()
    _remember_passwords(rest)
    _quiet_unwritable_threads()
    try:
        if any(a == "--print_config" or a.startswith("--print_config=") for a in rest):
            return _print_config(command, rest)
        return _run(command, rest)
    except KeyboardInterrupt as err:
        kept = getattr(err, "kept", None)
        counted = f"{kept} trial{'s' if kept != 1 else ''} kept; " if kept is not None else ""
        sys.stderr.write(f"lightning-dropout: interrupted; {counted}re-run to resume\n")
        return 130
    except BrokenPipeError:  # e.g. `lightning-dropout variants | head`: the reader has gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as exit_:  # --help, or a parser that printed its own message
        return int(exit_.code or 0) if isinstance(exit_.code, int) or exit_.code is None else 2
    except Exception as err:
        message = user_error(err)
        if message is None:  # a bug, not a bad input: the traceback helps
            raise
        config = _config_file(rest) if command in _VERBS and _VERBS[command].takes_config else None
        return _fail(message, config)


def _quiet_unwritable_threads() -> None:
    """A full disk also fails the background writers (TensorBoard's event thread): the main thread says it in
    one line, so those threads' tracebacks are not printed. Installed once per process (``main`` may run many
    times in one, as in the tests)."""
    if getattr(threading.excepthook, "_quiet_unwritable", False):
        return
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or unwritable(args.exc_value) is None:
            default(args)

    hook._quiet_unwritable = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _print_config(command: str, rest: list[str]) -> int:
    """``--print_config``: jsonargparse prints the resolved config and exits; the storage URL in it is redacted
    like every other line this program prints."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            return _run(command, rest)
    finally:
        sys.stdout.write(redact(out.getvalue()))


def _remember_passwords(rest: list[str]) -> None:
    """Note the passwords of the storage URLs on the command line, in ``$LIGHTNING_DROPOUT_STORAGE`` and in the
    config file before anything is parsed, so every line this process prints hides them, whatever their
    characters (:func:`~lightning_dropout.redaction.remember`)."""
    for arg in rest:
        remember_urls(arg)
    remember_urls(os.environ.get("LIGHTNING_DROPOUT_STORAGE", ""))
    config = _config_file(rest)
    if config is not None:
        with contextlib.suppress(
            OSError, ValueError
        ):  # a missing or unreadable file is reported by the parser
            remember_urls(Path(config).read_text(encoding="utf-8", errors="replace")[:1_000_000])


def _own_code_importable() -> None:
    """Put the current folder first on ``sys.path`` and on ``PYTHONPATH``, so ``class_path: mymodels.MyNet``
    imports ``./mymodels.py`` as ``python main.py`` with LightningCLI does, here and in every process this one
    starts (spawned workers inherit ``sys.path``; DDP ranks and trial processes inherit the environment)."""
    cwd = os.getcwd()
    if cwd not in {os.path.abspath(p or os.curdir) for p in sys.path}:
        sys.path.insert(0, cwd)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in {os.path.abspath(p) for p in paths}:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *paths])


def _run(command: str, rest: list[str]) -> int:
    verb = _VERBS.get(command)
    if verb is None:
        near = closest(command, _VERBS)
        raise DropoutConfigError(
            f"the command must be one of {list(_VERBS)}, but got {command!r}"
            + (f"; nearest: {near}." if near else ".")
        )
    return verb.run(rest)


def _config_file(rest: list[str]) -> str | None:
    args = _config_args(rest)
    files = [a for i, a in enumerate(args) if i > 0 and args[i - 1] in ("--config", "-c")]
    return files[-1] if files else None


def user_error(err: BaseException) -> str | None:
    """The one-line message of an error caused by the input (a config, a file, a URL, a command line), or
    ``None`` for any other error. Every command goes through here, so every bad input reads alike."""
    if isinstance(err, DropoutConfigError):
        return str(err)
    if type(err).__name__ == "ArgumentError":  # argparse/jsonargparse, with exit_on_error=False
        return str(err)
    if isinstance(err, UnicodeDecodeError):
        return (
            f"a file must be UTF-8 text, but byte {err.object[err.start]:#04x} at offset {err.start} is not."
        )
    full = unwritable(err)
    if full is not None:  # a full disk outside the trials (the study's figures, a report)
        where = f" `{err.filename}`" if isinstance(err, OSError) and err.filename else ""
        return f"stopped: cannot write{where}: {full}. What is stored is kept: make room (or make it writable) and run it again."
    if isinstance(err, OSError) and err.filename is not None:
        reason = (err.strerror or type(err).__name__).lower()
        return f"`{err.filename}` must be a path this user can read and write, but it is not: {reason}."
    return None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
