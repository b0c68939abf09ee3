"""The loggers of one trial or re-run: the config's own ``trainer.logger`` (any Lightning logger, or a list of
them), each given a per-run identity, and TensorBoard when the config names none.

A study trains many runs from one config, so each logger the config names is rebuilt per run with the run's
name (``trial_0003``, ``rerun_0003_seed1``) in the argument that identifies a run for its class:

* ``MLFlowLogger``: ``run_name`` (``"<study> trial_0003"``), in the config's experiment;
* ``WandbLogger``, ``CometLogger``, ``NeptuneLogger``: ``name`` (same form), each run a new run of the project;
* any other logger that takes a ``version`` (``TensorBoardLogger``, ``CSVLogger``, most custom loggers):
  ``version``, and, when the config leaves its ``name`` at the class default, ``name="<study>/trials"``, so
  runs land in ``<save_dir>/<study>/trials/<run>`` as the default TensorBoard layout does.

A ``TensorBoardLogger`` (or subclass) becomes a :class:`~lightning_dropout.tune.board.TrialLogger` with the same
arguments, which writes the study's single HParams record per run. Every other logger gets the same record
through ``log_hyperparams`` (the plan columns, trial, kind, seed, state, each prefixed ``study/``: Lightning
has already logged the module's own hyperparameters, a ``seed`` among them, and MLflow refuses a second value
for a key) and ``log_metrics`` (``hp/value``, the best value, its epoch, the gap there), then ``save()``. ``trainer.logger: false`` logs nothing.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.tune.board import TrialLogger

__all__ = ["check_loggers", "finish_loggers", "logger_specs", "trial_loggers", "uses_tensorboard"]

RECORD_PREFIX = "study/"  # the record's hyperparameters in loggers other than TensorBoard

# loggers whose run identity is not `version` (W&B's `version` is the run id: reusing one resumes that run)
_IDENTITY = {
    "MLFlowLogger": "run_name",
    "WandbLogger": "name",
    "CometLogger": "name",
    "NeptuneLogger": "name",
}


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (possibly nested) as plain dicts."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def logger_specs(config_logger: Any) -> list[dict[str, Any]] | None:
    """The config's ``trainer.logger`` as a list of ``{class_path, init_args}``; ``None`` when it names none
    (``null`` or ``true``: the study's TensorBoard default), ``[]`` for ``false``."""
    if config_logger is None or config_logger is True:
        return None
    if config_logger is False:
        return []
    items = (
        config_logger
        if isinstance(config_logger, Sequence) and not isinstance(config_logger, str)
        else [config_logger]
    )
    specs = []
    for item in items:
        spec = _plain(item)
        if not isinstance(spec, Mapping) or "class_path" not in spec:
            raise DropoutConfigError(
                "`trainer.logger` must be true, false, null or loggers given as class_path/init_args for a study "
                f"(each trial builds its own), but got {item!r}."
            )
        specs.append({"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})})
    return specs


def _class(path: str) -> type[Logger]:
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Logger)):
        raise DropoutConfigError(f"`trainer.logger` must name Lightning Logger classes, but got {path!r}.")
    return cls


def _with_identity(spec: Mapping[str, Any], study: str, run: str) -> tuple[type[Logger], dict[str, Any]]:
    """The logger class of ``spec`` and its arguments with run ``run``'s identity (see the module docstring)."""
    cls = _class(spec["class_path"])
    args = dict(spec["init_args"])
    params = inspect.signature(cls.__init__).parameters
    key = next((_IDENTITY[c.__name__] for c in cls.__mro__ if c.__name__ in _IDENTITY), None)
    if key is not None and key in params:
        args[key] = f"{study} {run}"
    elif "version" in params:
        args["version"] = run
        name = params.get("name")
        if name is not None and args.get("name", name.default) == name.default:
            args["name"] = f"{study}/trials"
    else:
        raise DropoutConfigError(
            f"`trainer.logger` {spec['class_path']} takes none of `version`, `run_name` or `name`, so the runs of "
            "a study cannot be told apart in it; use a logger that does, or leave `trainer.logger` unset."
        )
    return cls, args


def uses_tensorboard(specs: list[dict[str, Any]] | None) -> bool:
    """Whether the study's runs go to TensorBoard (the default, or a TensorBoardLogger in the config)."""
    return specs is None or any(issubclass(_class(s["class_path"]), TensorBoardLogger) for s in specs)


def check_loggers(specs: list[dict[str, Any]] | None) -> None:
    """Fail before trial 0 when a logger of the config cannot be imported or given a per-run identity."""
    for spec in specs or ():
        _with_identity(spec, "study", "check")


def trial_loggers(specs: list[dict[str, Any]] | None, run_dir: Path, study: str, run: str) -> list[Logger]:
    """The loggers of run ``run`` (``trial_0003``): those of ``specs`` (:func:`logger_specs`), each with the run's
    identity, or, when the config names none, a TensorBoard :class:`TrialLogger` in
    ``<run_dir>/<study>/trials/<run>``."""
    if specs is None:
        return [TrialLogger(run_dir / study, name="trials", version=run)]
    loggers: list[Logger] = []
    for spec in specs:
        cls, args = _with_identity(spec, study, run)
        loggers.append(TrialLogger(**args) if issubclass(cls, TensorBoardLogger) else cls(**args))
    return loggers


def finish_loggers(
    loggers: Sequence[Logger], params: Mapping[str, Any], metrics: Mapping[str, float]
) -> None:
    """Write the run's record: TensorBoard's single HParams record, or ``log_hyperparams`` + ``log_metrics``."""
    for logger in loggers:
        if isinstance(logger, TrialLogger):
            logger.finish(params, metrics)
            continue
        # prefixed: Lightning already logged the module's and datamodule's hparams (`seed`...), which some
        # trackers (MLflow) refuse to see logged again with another value
        logger.log_hyperparams({f"{RECORD_PREFIX}{k}": v for k, v in params.items()})
        logger.log_metrics(dict(metrics), step=0)
        logger.save()
