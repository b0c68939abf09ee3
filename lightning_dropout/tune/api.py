"""Tuning from Python: build a study from objects and get the result back, on the same code path as
``lightning-dropout tune``.

:func:`tune_study` turns its arguments into the config a YAML file would hold (``model``, ``data`` and
``trainer`` in LightningCLI's ``class_path``/``init_args`` form, ``dropout`` and ``study``), writes it to
``<run_dir>/<study>/config.yaml`` (so ``lightning-dropout tune`` / ``best`` / ``report`` work on the same study
from the shell, and ``tune`` on that file resumes it) and runs :func:`lightning_dropout.tune.study.tune` on it:
every check, worker, DDP trial, re-run and output of the CLI applies. The storage URL is passed as an argument,
never written to the file (it may hold a password).

Example::

    from lightning_dropout.data import MNIST1DDataModule
    from lightning_dropout.tune import SearchGroup, tune_study
    from lightning_dropout.zoo import MLP

    result = tune_study(
        MLP, MNIST1DDataModule,
        trainer={"max_epochs": 30},
        dropout=[SearchGroup(name="hidden", select={"match": "Linear"}, variants=["standard", "gaussian"])],
        study={"name": "mlp", "n_trials": 20},
    )
    result.plan            # the winning DropoutPlan; result.candidates: the re-run table; result.study: Optuna's
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from rich.console import Console

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.tune.config import ClassSpec, StudyConfig
from lightning_dropout.tune.records import open_study
from lightning_dropout.tune.selection import Candidate
from lightning_dropout.tune.space import SearchGroup
from lightning_dropout.tune.study import tune

__all__ = ["StudyResult", "tune_study"]


@dataclass
class StudyResult:
    """What :func:`tune_study` returns.

    Attributes:
        plan: the winning plan (``None`` when no trial completed).
        candidates: the re-run candidates, best mean first (empty with ``study.seeds <= 1``).
        study: the ``optuna.Study`` (every trial, its plan and metrics in its user attributes).
        plan_path: where the winning plan was written (``best_plan.yaml``), or ``None``.
        config_path: the study's config as YAML: ``lightning-dropout tune`` on it resumes the study.
    """

    plan: DropoutPlan | None
    candidates: list[Candidate]
    study: optuna.Study
    plan_path: Path | None
    config_path: Path


def _class_path(cls: Any, what: str) -> str:
    if not isinstance(cls, type):
        raise DropoutConfigError(
            f"`{what}` must be a class (each trial builds a fresh one from it and its arguments), but got {cls!r}."
        )
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value: Any, what: str) -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # a StudyConfig's sampler/pruner are ClassSpecs: written to the config as the mappings they hold
        return {
            k: v.serialize() if isinstance(v, ClassSpec) else v for k, v in dataclasses.asdict(value).items()
        }
    if isinstance(value, Mapping):
        return dict(value)
    raise DropoutConfigError(f"`{what}` must be a mapping or a {what} dataclass, but got {value!r}.")


def tune_study(
    model: type,
    data: type,
    *,
    model_args: Mapping[str, Any] | None = None,
    data_args: Mapping[str, Any] | None = None,
    trainer: Mapping[str, Any] | None = None,
    dropout: Sequence[SearchGroup | Mapping[str, Any]],
    study: StudyConfig | Mapping[str, Any] | None = None,
    search: Mapping[str, Mapping[str, Any]] | None = None,
    seed_everything: int | None = None,
    overrides: Sequence[str] = (),
    console: Console | None = None,
) -> StudyResult:
    """Run (or resume) a tuning study of ``model`` on ``data`` and return its result.

    Args:
        model: the LightningModule class; each trial builds a fresh one with ``model_args``. It must be
            importable by its module path (not defined in ``__main__``) when trials run in other processes
            (``study.workers > 1``, DDP trials).
        data: the LightningDataModule class, built with ``data_args``.
        trainer: ``lightning.Trainer`` arguments, as in a config's ``trainer:`` section (callbacks and loggers
            as ``class_path``/``init_args`` mappings).
        dropout: the search groups (:class:`~lightning_dropout.tune.space.SearchGroup` or their mappings).
        study: the ``study:`` settings (:class:`~lightning_dropout.tune.config.StudyConfig` or a mapping of
            its fields); ``storage`` is passed on as an argument, never written to the config file.
        search: other config values to search beside dropout, as a ``search:`` section: dotted keys
            (``"model.init_args.weight_decay"``) to distributions (``{"low": 1e-5, "high": 1e-2, "log": True}``).
        seed_everything: LightningCLI's ``seed_everything``.
        overrides: further config arguments, as on the command line (``"--trainer.max_epochs=5"``).
        console: where progress goes (stderr by default; the result table goes to stdout, as with the CLI).
    """
    if any(str(o).startswith(("--study.", "--dropout.")) for o in overrides):
        raise DropoutConfigError(
            f"`overrides` must not set study or dropout keys (pass them in `study` and `dropout`), but got "
            f"{[o for o in overrides if str(o).startswith(('--study.', '--dropout.'))]}."
        )
    settings = _plain(study if study is not None else {}, "StudyConfig")
    storage = settings.pop("storage", None)
    groups = [_plain(g, "SearchGroup") for g in dropout]
    config: dict[str, Any] = {
        "model": {"class_path": _class_path(model, "model"), "init_args": dict(model_args or {})},
        "data": {"class_path": _class_path(data, "data"), "init_args": dict(data_args or {})},
        "trainer": dict(trainer or {}),
        "dropout": {"groups": groups},
        "study": settings,
    }
    for what, cls in (("model", model), ("data", data)):
        if getattr(cls, "__module__", None) == "__main__":
            warnings.warn(
                f"`{what}` class {cls.__qualname__} is defined in __main__ (your script), so the study's "
                f"config.yaml names `__main__.{cls.__qualname__}`, which `lightning-dropout tune|best|fit` "
                "cannot import from the shell: move the class into a module (e.g. mymodels.py beside the script) "
                "and import it from there.",
                stacklevel=2,
            )
    if search:
        config["search"] = {key: dict(spec) for key, spec in search.items()}
    if seed_everything is not None:
        config["seed_everything"] = seed_everything
    # validate before writing: the same dataclasses the config loader builds
    checked = StudyConfig(**settings)
    for group in groups:
        SearchGroup(**group)
    path = Path(checked.run_dir) / checked.name / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = ["--config", str(path), *([f"--study.storage={storage}"] if storage else []), *overrides]
    plan, candidates, plan_path = tune(args, console)
    url = StudyConfig(**{**settings, "storage": storage}).storage_url()
    return StudyResult(plan, candidates, open_study(checked.name, url), plan_path, path)
