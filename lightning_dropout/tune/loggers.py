"""The loggers of one trial or re-run: the config's own ``trainer.logger`` (any Lightning logger, or a list of
them), each given a per-run identity, and TensorBoard when the config names none.

A study trains many runs from one config, so each logger the config names is rebuilt per run with the run's
name (``trial_0003``, ``rerun_0003_seed1``) in the argument that identifies a run for its class:

* ``MLFlowLogger``: ``run_name`` (``"<study> trial_0003"``), in the config's experiment, with the tags ``study``,
  ``trial`` (the study's trial number; a re-run's is the trial it re-runs) and ``kind`` (``trial``/``rerun``),
  and as a child (``mlflow.parentRunId``) of the study's parent run (``"<study> study"``, tag ``kind=study``:
  :func:`open_parent_runs`), which receives the study's summary when it ends (:func:`publish_study`);
* ``WandbLogger``: ``name`` (same form), ``group`` the study (unless the config sets one), ``job_type`` the kind;
* ``CometLogger``, ``NeptuneLogger``: ``name`` (same form), each run a new run of the project;
* any other logger that takes a ``version`` (``TensorBoardLogger``, ``CSVLogger``, most custom loggers):
  ``version``, and, when the config leaves its ``name`` at the class default, ``name="<study>/trials"`` (re-runs:
  ``"<study>/reruns"``), so runs land in ``<save_dir>/<study>/trials/<run>`` as the default TensorBoard layout
  does.

Logged keys name a site ``<target>.<where>`` (``dropout/rate/fc1.output``): every logger accepts it, where the
plan key's ``:`` is refused by MLflow.

A ``TensorBoardLogger`` (or subclass) becomes a :class:`~lightning_dropout.tune.board.TrialLogger` with the same
arguments, which writes the study's single HParams record per run. Every other logger gets the same record
through ``log_hyperparams`` (the plan columns, trial, kind, seed, state, each prefixed ``study/``: Lightning
has already logged the module's own hyperparameters, a ``seed`` among them, and MLflow refuses a second value
for a key) and ``log_metrics`` (``hp/value``, the best value, its epoch, the gap there), then ``save()``. ``trainer.logger: false`` logs nothing.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.tune.board import RUN_FOLDERS, TrialLogger
from lightning_dropout.tune.records import PARENT_RUNS_ATTR

if TYPE_CHECKING:
    import optuna

__all__ = [
    "check_loggers",
    "finish_loggers",
    "logger_specs",
    "open_parent_runs",
    "publish_study",
    "trial_loggers",
    "uses_tensorboard",
]

log = logging.getLogger(__name__)

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


def _is(cls: type, name: str) -> bool:
    return any(c.__name__ == name for c in cls.__mro__)


def _with_identity(
    spec: Mapping[str, Any], study: str, run: str, kind: str = "trial", number: int | None = None
) -> tuple[type[Logger], dict[str, Any]]:
    """The logger class of ``spec`` and its arguments with run ``run``'s identity (see the module docstring)."""
    cls = _class(spec["class_path"])
    args = dict(spec["init_args"])
    params = inspect.signature(cls.__init__).parameters
    key = next((_IDENTITY[c.__name__] for c in cls.__mro__ if c.__name__ in _IDENTITY), None)
    if _is(cls, "MLFlowLogger"):
        tags = {"study": study, "trial": "-" if number is None else str(number), "kind": kind}
        if spec.get("parent_run_id"):
            tags["mlflow.parentRunId"] = spec["parent_run_id"]
        args["tags"] = {**dict(args.get("tags") or {}), **tags}
    elif _is(cls, "WandbLogger"):  # W&B's own grouping of runs: the study, and the kind of run
        args.setdefault("group", study)
        args.setdefault("job_type", kind)
    if key is not None and key in params:
        args[key] = f"{study} {run}"
    elif "version" in params:
        args["version"] = run
        name = params.get("name")
        if name is not None and args.get("name", name.default) == name.default:
            args["name"] = f"{study}/{RUN_FOLDERS.get(kind, RUN_FOLDERS['trial'])}"
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


def trial_loggers(
    specs: list[dict[str, Any]] | None,
    run_dir: Path,
    study: str,
    run: str,
    kind: str = "trial",
    number: int | None = None,
) -> list[Logger]:
    """The loggers of run ``run`` (``trial_0003``) of ``kind`` (``trial``/``rerun``) for study trial ``number``:
    those of ``specs`` (:func:`logger_specs`), each with the run's identity, or, when the config names none, a
    TensorBoard :class:`TrialLogger` in ``<run_dir>/<study>/trials/<run>`` (re-runs: ``reruns/<run>``)."""
    if specs is None:
        return [TrialLogger(run_dir / study, name=RUN_FOLDERS.get(kind, RUN_FOLDERS["trial"]), version=run)]
    loggers: list[Logger] = []
    for spec in specs:
        cls, args = _with_identity(spec, study, run, kind, number)
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


def _parent_args(spec: Mapping[str, Any], study: str) -> dict[str, Any]:
    args = dict(spec["init_args"])
    args["run_name"] = f"{study} study"
    args["tags"] = {**dict(args.get("tags") or {}), "study": study, "kind": "study"}
    return args


def open_parent_runs(specs: list[dict[str, Any]] | None, study: optuna.Study) -> None:
    """Give each MLflow logger of ``specs`` the study's parent run: created by the first ``tune`` of the study
    (its id kept in the study's storage, so the workers, a resumed study and a joining machine find it) and named
    by every trial and re-run as its parent (``mlflow.parentRunId``)."""
    stored = dict(study.user_attrs.get(PARENT_RUNS_ATTR) or {})
    created = False
    for index, spec in enumerate(specs or ()):
        cls = _class(spec["class_path"])
        if not _is(cls, "MLFlowLogger"):
            continue
        if str(index) not in stored:
            stored[str(index)] = cls(**_parent_args(spec, study.study_name)).run_id  # type: ignore[attr-defined]
            created = True
        spec["parent_run_id"] = stored[str(index)]
    if created:
        study.set_user_attr(PARENT_RUNS_ATTR, stored)


def publish_study(
    specs: list[dict[str, Any]] | None, study: optuna.Study, plan_path: Path | None = None
) -> None:
    """Send the study's summary to the config's loggers: for MLflow, to the study's parent run (tags ``winner``
    and ``winner_trial``, artifacts ``report.html``, ``results.md`` (the comparison table) and the winner's
    ``best_plan.yaml``), then marked finished. TensorBoard gets the same figures and table in the run ``study``
    (:func:`~lightning_dropout.tune.report.write_study_images`)."""
    from lightning_dropout.tune.records import winner, winner_trial
    from lightning_dropout.tune.report import markdown_results, write_report

    for spec in specs or ():
        cls = _class(spec["class_path"])
        run_id = spec.get("parent_run_id")
        if not (_is(cls, "MLFlowLogger") and run_id):
            continue
        args = {**_parent_args(spec, study.study_name), "run_id": run_id}
        logger = cls(**args)
        client = logger.experiment  # type: ignore[attr-defined]  # an MLFlowLogger: its MlflowClient
        client.set_tag(run_id, "winner", winner(study)[1])
        client.set_tag(run_id, "winner_trial", str(winner_trial(study).number))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            files = [write_report(study, folder / "report.html")]
            files.append(folder / "results.md")
            files[-1].write_text(markdown_results(study) + "\n", encoding="utf-8")
            if plan_path is not None and Path(plan_path).is_file():
                files.append(Path(plan_path))
            for path in files:
                client.log_artifact(run_id, str(path))
        logger.finalize("success")
        log.debug("study summary sent to MLflow run %s", run_id)
