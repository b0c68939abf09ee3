"""Training a study's winner: its searched values written beside its plan, the command that trains it, and the
values ``fit --plan`` applies.

A study with a ``search:`` section (learning rate, weight decay, batch size, ...) finds a winner that is a plan
*and* the values its trial trained with. The plan goes to ``best_plan.yaml``; the values go beside it, to
``best_values.yaml`` (:func:`values_path`: ``X_plan.yaml`` pairs with ``X_values.yaml``), as a LightningCLI
config fragment::

    model:
      init_args:
        lr: 0.0123
    data:
      init_args:
        batch_size: 50

``lightning-dropout fit CONFIG --plan best_plan.yaml`` reads the file paired with the plan and sets each value
(command-line overrides still win); being a config fragment, it also works as a second ``--config``. The plan
file itself stays a plain plan (``DropoutInjector(plan=...)`` and ``study.enqueue`` read it unchanged).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.tune.records import SEARCH_ATTR, trial_label, winner_trial

__all__ = [
    "apply_values",
    "format_values",
    "load_values",
    "save_values",
    "searched_values",
    "train_command",
    "values_path",
    "winner_lines",
]

# the config arguments of `tune` that only the study reads: left out of the command that trains the winner
_STUDY_ONLY = ("--study.", "--dropout.", "--search", "--print_config")


def values_path(plan_path: str | Path) -> Path:
    """The searched-values file paired with a plan file: ``best_plan.yaml`` -> ``best_values.yaml``,
    ``plan.yaml`` -> ``plan_values.yaml``."""
    path = Path(plan_path)
    stem = path.stem[: -len("_plan")] if path.stem.endswith("_plan") else path.stem
    return path.with_name(f"{stem}_values.yaml")


def searched_values(study: optuna.Study) -> dict[str, Any]:
    """The ``search:`` values the winner's trial trained with (dotted config keys; empty without ``search:``)."""
    return dict(winner_trial(study).user_attrs.get(SEARCH_ATTR) or {})


def format_values(values: Mapping[str, Any]) -> str:
    """``model.init_args.lr=0.0123, data.init_args.batch_size=50``."""
    return ", ".join(f"{key}={value!r}" for key, value in values.items())


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in values.items():
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, Mapping) or not data:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return out


def save_values(values: Mapping[str, Any], plan_path: str | Path, origin: str = "") -> Path | None:
    """Write ``values`` to the file paired with ``plan_path`` (:func:`values_path`) and return it; with no values,
    remove a file left there by an earlier winner (it would be applied to this plan) and return ``None``."""
    path = values_path(plan_path)
    if not values:
        path.unlink(missing_ok=True)
        return None
    header = (
        f"# the searched values of {origin or 'the winner'}, paired with {Path(plan_path).name}:\n"
        f"# `lightning-dropout fit CONFIG --plan {Path(plan_path).name}` sets them (or pass this file as a "
        "second --config)\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(_nest(values), sort_keys=False))
    return path


def load_values(plan_path: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The file paired with ``plan_path`` and its values as dotted keys, or ``None`` when there is none."""
    path = values_path(plan_path)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DropoutConfigError(
            f"{path}: the searched values of a plan must be a YAML mapping, but reading it failed: "
            f"{str(err).splitlines()[0]}."
        ) from None
    if not isinstance(data, Mapping):
        raise DropoutConfigError(
            f"{path}: the searched values of a plan must be a YAML mapping (model: {{init_args: {{lr: ...}}}}), "
            f"but got {data!r}."
        )
    return path, _flatten(data)


def _given(args: Sequence[str], key: str) -> bool:
    """Whether the command line sets ``key`` (``--model.init_args.lr=...``, or its short form
    ``--model.lr``)."""
    flags = {f"--{key}", f"--{key.replace('.init_args.', '.')}"}
    return any(arg.partition("=")[0] in flags for arg in args)


def apply_values(
    plan_path: str | Path, config: Any, args: Sequence[str], command: str = "fit"
) -> tuple[Path | None, dict[str, Any], dict[str, Any]]:
    """The values ``fit --plan`` sets: those of the file paired with ``plan_path``, each a key of the parsed
    ``config`` (a jsonargparse Namespace). Returns the file, the values to set (those the command line
    ``args`` do not set) and those the command line overrides. A key the config does not have is refused in one
    line with the command that trains the winner with the config that has it."""
    found = load_values(plan_path)
    if found is None:
        return None, {}, {}
    path, values = found
    keys = {str(k) for k in config.keys()}  # noqa: SIM118  (a Namespace iterates over its top-level keys)
    missing = [key for key in values if key not in keys]
    if missing:
        raise DropoutConfigError(
            f"the searched values of plan {plan_path} ({path}) must be keys of the config, but {missing} are "
            f"not (is this the config the study tuned?); train the winner with the study's config: "
            f"`lightning-dropout {command} STUDY_CONFIG.yaml --plan {plan_path}`, or write it whole with "
            "`lightning-dropout best STUDY --config-out winner.yaml`."
        )
    overridden = {key: value for key, value in values.items() if _given(args, key)}
    return path, {k: v for k, v in values.items() if k not in overridden}, overridden


def train_command(args: Sequence[str], plan_path: str | Path) -> str:
    """The command that trains the winner: ``lightning-dropout fit CONFIG [overrides] --plan PLAN``, from the
    config arguments ``tune`` was given (the config files and the overrides of model, data and trainer; the
    study's own keys left out)."""
    args = list(args)
    configs: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            configs.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            configs.append(arg.partition("=")[2])
        elif arg.startswith(_STUDY_ONLY):
            # `--study.storage URL` given as two words: skip the value too
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
        else:
            rest.append(arg)
        i += 1
    words = ["lightning-dropout", "fit"]
    if configs:
        words.append(configs[0])
        for extra in configs[1:]:
            words += ["--config", extra]
    words += [*rest, "--plan", str(plan_path)]
    return " ".join(shlex.quote(w) for w in words)


def winner_lines(args: Sequence[str], study: optuna.Study, plan_path: str | Path) -> list[str]:
    """The last lines of ``tune``: the winner's searched values (written beside the plan, see
    :func:`save_values`) and the command that trains the winner (:func:`train_command`)."""
    values = searched_values(study)
    lines = []
    origin = f"the winner of study {study.study_name} ({trial_label(winner_trial(study))})"
    saved = save_values(values, plan_path, origin)
    if saved is not None:
        lines.append(f"searched values of the winner: {format_values(values)} (written to {saved})")
    lines.append(f"train the winner: {train_command(args, plan_path)}")
    return lines
