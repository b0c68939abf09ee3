"""TensorBoard for studies: one run per trial with a fixed HParams key set, and the study's figures as images.

TensorBoard's HParams dashboard takes its columns from one arbitrary run's experiment record and shows the
*last* scalar of each metric tag, so (see ``docs/architecture.md``):

* every trial of a study writes the same hyperparameter keys: the plan flattened over every site the search
  space can produce on the model (absent sites are filled with ``variant="none"``, ``p=0.0``), plus the trial's
  number, kind, baseline, seed and final state (``complete``/``pruned``/``failed``);
* the metrics are written once, when the trial has finished: the best validation value (not the last), the
  epoch it was reached and the generalization gap at that epoch (``GapMonitor``), so pruned and failed trials
  get a row too;
* Lightning's automatic ``log_hyperparams`` call (the module's ``hparams`` with a placeholder metric, at fit
  start) is folded into that single record instead of writing a second, conflicting one;
* a run writes its values only (the session), never an experiment summary: TensorBoard takes the columns, their
  types and ``differs`` from one arbitrary run's summary, and a run cannot know which of its columns vary. The
  study writes the one summary, when it ends (:func:`write_experiment`, in the run ``study``): every column with
  its domain, ``differs`` where the runs hold more than one value, and the metrics with their labels;
* TensorBoard lists the varying columns first, then sorts them by name, and ticks the first five: so each
  column's name starts with its rank (:func:`column_name`: ``1 trial``, ``2 kind``, ``3 state``, then the
  sites ``4 dropout/fc1.output/p``..., then ``5 seed``, ``5 module/lr``...), which the dashboard hides (the
  summary gives each column its plain name as display name);
* re-runs are their own runs under ``reruns/`` (``trials/trial_0003``, ``reruns/rerun_0003_seed1``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch import nn
from typing_extensions import override

from lightning_dropout.plan import DropoutPlan
from lightning_dropout.scalars import site_name
from lightning_dropout.tune.space import SearchGroup, all_dimensions

__all__ = [
    "Columns",
    "TrialLogger",
    "column_name",
    "display_name",
    "plan_columns",
    "plan_hparams",
    "study_columns",
    "trial_hparams",
    "write_experiment",
]

log = logging.getLogger(__name__)

NO_VARIANT = "none"
NO_PARAM = "-"
RUN_FOLDERS = {"trial": "trials", "rerun": "reruns"}  # a study's TensorBoard runs, by kind
_FIRST_COLUMNS = ("trial", "kind", "state")  # then the sites, then the rest
_EXPERIMENT_SUFFIX = ".hparams"  # the event file of the study's HParams summary


def column_name(key: str) -> str:
    """The HParams column name of record key ``key``: its rank, a space, the key. TensorBoard lists the varying
    columns first and sorts them by name, so the rank orders them: ``trial``, ``kind``, ``state``, the sites
    (``dropout/...``), then the rest.

    >>> column_name("trial"), column_name("state"), column_name("dropout/fc1.output/p"), column_name("seed")
    ('1 trial', '3 state', '4 dropout/fc1.output/p', '5 seed')
    """
    if key in _FIRST_COLUMNS:
        rank = _FIRST_COLUMNS.index(key) + 1
    else:
        rank = len(_FIRST_COLUMNS) + (1 if key.startswith("dropout/") else 2)
    return f"{rank} {key}"


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    """An HParams plugin summary (what TensorBoard's own ``hparams`` summaries write, without TensorFlow)."""
    data.version = metadata.PLUGIN_DATA_VERSION
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def _session_start(values: Mapping[str, Any]) -> Summary:
    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in values.items():
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[name].number_value = value
        else:
            info.hparams[name].string_value = str(value)
    return _summary(
        metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=info)
    )


def _session_end() -> Summary:
    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    return _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info))


def display_name(column: str) -> str:
    """The key of an HParams column name (:func:`column_name`), which the dashboard shows."""
    rank, _, key = column.partition(" ")
    return key if rank.isdigit() and key else column


def plan_columns(
    groups: Sequence[SearchGroup], model: nn.Module, example_input: Any = None
) -> dict[str, list[str]]:
    """Every site key the search space can produce on ``model`` (``"<target>:<where>"``, e.g. ``fc1:output``,
    ``fc1:weight`` for DropConnect), in model order, with the variant parameter names searched there."""
    columns: dict[str, list[str]] = {}
    for group in groups:
        for variant, plan in group.probe(model, example_input).items():
            searched = sorted(group.params.get(variant, {}))
            for site in plan:
                names = columns.setdefault(site.key, [])
                names.extend(n for n in searched if n not in names)
    return columns


@dataclass(frozen=True)
class Columns:
    """A study's HParams dropout columns, the same for all its runs.

    Attributes:
        sites: every site key the search space can produce, with the variant parameters searched there
            (:func:`plan_columns`): a site's ``variant``, ``p`` and parameters come from the trial's plan.
        choices: the Optuna names of the searched choices that are not a site's (``hidden/depth_scaling``):
            every dimension of the space that belongs to no variant, other than the variant itself.
    """

    sites: Mapping[str, Sequence[str]] = field(default_factory=dict)
    choices: Sequence[str] = ()


def study_columns(groups: Sequence[SearchGroup], model: nn.Module, example_input: Any = None) -> Columns:
    """The :class:`Columns` of a study of ``groups`` on ``model``."""
    choices = [
        dim.name
        for dim in all_dimensions(groups, model, example_input)
        if dim.variant is None and dim.key != "variant" and not dim.fixed
    ]
    return Columns(plan_columns(groups, model, example_input), choices)


def trial_hparams(plan: DropoutPlan, columns: Columns, params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's dropout hyperparameters: its ``plan`` over the site columns (:func:`plan_hparams`), and each
    choice column as ``dropout/<name>`` with the value the trial's Optuna ``params`` hold (as text, ``"-"``
    when it has none: a baseline, an enqueued plan).

    >>> from lightning_dropout.plan import Site
    >>> plan = DropoutPlan([Site("fc1", "output", "standard", 0.2)])
    >>> trial_hparams(plan, Columns({"fc1:output": []}, ["hidden/depth_scaling"]), {"hidden/depth_scaling": "linear"})
    {'dropout/fc1.output/variant': 'standard', 'dropout/fc1.output/p': 0.2, 'dropout/hidden/depth_scaling': 'linear'}
    """
    out = plan_hparams(plan, columns.sites)
    for name in columns.choices:
        out[f"dropout/{name}"] = str(params[name]) if name in params else NO_PARAM
    return out


def plan_hparams(plan: DropoutPlan, columns: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The plan as flat hyperparameters with the same keys for every plan of a study: ``dropout/<site>/variant``
    (``"none"`` when the plan has no site there), ``dropout/<site>/p`` (``0.0``) and ``dropout/<site>/<param>``
    (as text, ``"-"`` when absent: one type per column). Sites outside ``columns`` are added too. ``<site>`` is
    written ``<target>.<where>`` (:func:`~lightning_dropout.scalars.site_name`): every logger accepts it.

    >>> from lightning_dropout.plan import Site
    >>> plan = DropoutPlan([Site("fc1", "output", "dropblock", 0.2, {"block_size": 3})])
    >>> plan_hparams(plan, {"fc1:output": ["block_size"], "fc2:output": []})
    {'dropout/fc1.output/variant': 'dropblock', 'dropout/fc1.output/p': 0.2, 'dropout/fc1.output/block_size': '3', 'dropout/fc2.output/variant': 'none', 'dropout/fc2.output/p': 0.0}
    """
    sites = {site.key: site for site in plan}
    keys = {k: list(v) for k, v in columns.items()}
    for key, present in sites.items():
        names = keys.setdefault(key, [])
        names.extend(n for n in sorted(present.params) if n not in names)
    out: dict[str, Any] = {}
    for key, names in keys.items():
        site = sites.get(key)
        column = f"dropout/{site_name(key)}"
        out[f"{column}/variant"] = site.variant if site is not None else NO_VARIANT
        out[f"{column}/p"] = float(site.p) if site is not None else 0.0
        for name in names:
            value = site.params.get(name) if site is not None else None
            out[f"{column}/{name}"] = NO_PARAM if value is None else str(value)
    return out


class TrialLogger(TensorBoardLogger):
    """A TensorBoardLogger that writes one HParams record per run, when :meth:`finish` is called: the run's
    values (a session, columns named by :func:`column_name`) and its metrics, but no experiment summary (the
    study writes one for all its runs, :func:`write_experiment`).

    Lightning's own ``log_hyperparams`` call (the module's and datamodule's ``hparams``) is kept and merged
    into that record under ``module/``; ``finalize`` is deferred to :meth:`finish`, so everything lands in
    one event file.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)
        self._module_hparams: dict[str, Any] = {}
        self._status = "success"

    @override
    def log_hyperparams(self, params: Any, metrics: Any = None) -> None:  # type: ignore[override]
        self._module_hparams.update(params if isinstance(params, Mapping) else vars(params))

    @override
    def finalize(self, status: str) -> None:
        self._status = status
        if self._experiment is not None:
            self.experiment.flush()

    def finish(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Write the run's single HParams record (``params`` plus the module's, ``metrics`` as scalars at
        step 0) and close the event file."""
        # Lightning flattens nested mappings (`module/<key>/...`) and turns other values into text
        module = {
            k: v for k, v in self._module_hparams.items() if v is not None and not k.startswith("_")
        }  # `_`: e.g. LightningCLI's `_instantiator`
        merged = _convert_params({**({"module": module} if module else {}), **params})
        self.hparams.update(merged)  # hparams.yaml, as Lightning's own call keeps it
        flat = self._sanitize_params(_flatten_dict(merged))
        clean = {k: (float(v) if v is not None else math.nan) for k, v in metrics.items()}
        self.log_metrics(clean, 0)
        writer = self.experiment._get_file_writer()
        session = {column_name(k): v for k, v in flat.items()}
        writer.add_summary(_session_start(session), 0)
        writer.add_summary(_session_end(), 0)
        super().finalize(self._status)


def _run_records(study_dir: Path) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """Each TensorBoard run of the study under ``study_dir`` (``trials/*``, ``reruns/*``): its session's values
    (HParams column -> protobuf ``Value``) and its ``hp/`` metric tags, in the order written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for folder in RUN_FOLDERS.values():
        for run in sorted((study_dir / folder).glob("*")):
            values: dict[str, Any] = {}
            tags: list[str] = []
            for path in sorted(run.glob("events.out.tfevents*")):
                for event in EventFileLoader(str(path)).Load():
                    for value in event.summary.value:
                        if value.tag == metadata.SESSION_START_INFO_TAG:
                            data = plugin_data_pb2.HParamsPluginData.FromString(
                                value.metadata.plugin_data.content
                            )
                            values.update(data.session_start_info.hparams)
                        elif value.tag.startswith("hp/") and value.tag not in tags:
                            tags.append(value.tag)
            if values:
                yield values, tags


def _hparam_info(name: str, values: list[Any]) -> api_pb2.HParamInfo:
    """A column's info: its type, its domain (the distinct texts, or the numbers' range) and whether it
    differs between the runs."""
    info = api_pb2.HParamInfo(name=name, display_name=display_name(name))
    kinds = {v.WhichOneof("kind") for v in values}
    if kinds == {"number_value"}:
        numbers = sorted({v.number_value for v in values if not math.isnan(v.number_value)})
        info.type = api_pb2.DATA_TYPE_FLOAT64
        if numbers:
            info.domain_interval.min_value, info.domain_interval.max_value = numbers[0], numbers[-1]
        info.differs = len(numbers) > 1
    elif kinds == {"bool_value"}:
        flags = sorted({v.bool_value for v in values})
        info.type = api_pb2.DATA_TYPE_BOOL
        info.domain_discrete.extend(flags)
        info.differs = len(flags) > 1
    else:  # text, or mixed types: as text
        texts = sorted({v.string_value if v.HasField("string_value") else str(_plain(v)) for v in values})
        info.type = api_pb2.DATA_TYPE_STRING
        info.domain_discrete.extend(texts)
        info.differs = len(texts) > 1
    return info


def _plain(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    return getattr(value, kind) if kind else None


def write_experiment(
    study_dir: str | Path, out: str | Path, metric_labels: Mapping[str, str] | None = None
) -> int:
    """Write the study's HParams experiment summary into the run folder ``out`` (replacing an earlier one): every
    column that the runs under ``study_dir`` recorded (``trials/*``, ``reruns/*``), with its domain, ``differs``
    set where the runs hold more than one value, its plain name as display name, and the runs' ``hp/`` metrics
    (``metric_labels``: a description per metric tag). Returns the number of runs read (0: nothing written)."""
    study_dir, out = Path(study_dir), Path(out)
    columns: dict[str, list[Any]] = {}
    metrics: list[str] = []
    runs = 0
    for values, tags in _run_records(study_dir):
        runs += 1
        for name, value in values.items():
            columns.setdefault(name, []).append(value)
        metrics.extend(t for t in tags if t not in metrics)
    if not runs:
        return 0
    labels = dict(metric_labels or {})
    experiment = api_pb2.Experiment(
        description="Dropout study: one session per trial and re-run (lightning-dropout).",
        time_created_secs=time.time(),
        hparam_infos=[_hparam_info(name, values) for name, values in sorted(columns.items())],
        metric_infos=[
            api_pb2.MetricInfo(
                name=api_pb2.MetricName(tag=tag),
                display_name=labels.get(tag, ""),
                description=labels.get(tag, ""),
            )
            for tag in metrics
        ],
    )
    summary = _summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))
    from torch.utils.tensorboard.writer import FileWriter

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"events.out.tfevents*{_EXPERIMENT_SUFFIX}"):
        old.unlink()  # TensorBoard keeps the first summary of a tag it reads in a run: one file, rewritten
    writer = FileWriter(str(out), filename_suffix=_EXPERIMENT_SUFFIX)
    try:
        writer.add_summary(summary, 0)
    finally:
        writer.close()
    log.debug("HParams experiment of %d runs written to %s", runs, out)
    return runs
