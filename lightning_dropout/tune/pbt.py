"""Population-based training (PBT) of the dropout rates, coordinated through the Optuna storage (``study.method:
pbt``; the decisions are in :mod:`~lightning_dropout.tune.population`).

Every *segment* (one member training ``interval`` x ``max_epochs`` epochs) is one Optuna trial, enqueued with
its member, generation, rates, start checkpoint and the member it copied in its user attributes
(``pbt_member``, ``pbt_generation``, ``pbt_rates``, ``pbt_start``, ``pbt_copied_from``) and the label
``pbt g<generation> m<member>`` (:data:`~lightning_dropout.tune.records.PBT_ATTR`). Workers, on one machine or
many, pop the waiting segments through ``study.optimize`` (Optuna hands each waiting trial to one process), so
the method runs wherever a study runs: SQLite, PostgreSQL, a journal file, several ``study.workers``.

A segment builds the model, datamodule and trainer from the config, injects the member's plan (each search
group at its first variant; one rate per group, or per site for ``per_layer`` groups), resumes weights,
optimizer, scheduler and progress counters from its start checkpoint (``fit(ckpt_path=...)``), trains to its
end epoch, saves ``<run_dir>/<study>/pbt/member_<m>/gen_<g>.ckpt``, reports each validation at its global epoch
and returns the study's value estimator (``study.value``) on its own curve. It logs to the member's TensorBoard
run ``trials/member_<m>``, so a member reads as one run whose rates change.

Whichever worker finds a generation finished enqueues the next (exploit and explore, decided identically in
every process from the storage's values and ``study.seed``). Two workers that do it at the same moment enqueue
twins; the first of a label runs, the later one is recorded as a duplicate and not run (the check of
:func:`~lightning_dropout.tune.fixed.duplicate_of`). A segment interrupted by Ctrl-C is enqueued again when the
study resumes; one of a killed worker is failed by the RDB heartbeat and retried from its start checkpoint
(journal storages have no heartbeat). The start checkpoints must be readable by every worker: on several
machines, ``study.run_dir`` must be a shared filesystem.

The result is the best member of the last generation, its checkpoint, and the rate schedule its lineage followed
(through its copies), written as a scheduled plan (:attr:`~lightning_dropout.plan.Site.rates`) that ``fit --plan``
replays.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from lightning_dropout.callback import DropoutInjector
from lightning_dropout.config import quiet_lightning
from lightning_dropout.errors import DropoutConfigError, unwritable
from lightning_dropout.injection import resolve
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.redaction import redact
from lightning_dropout.tune import ctrl_c
from lightning_dropout.tune.board import TrialLogger, plan_hparams
from lightning_dropout.tune.fixed import duplicate_of
from lightning_dropout.tune.loggers import finish_loggers, trial_loggers
from lightning_dropout.tune.population import (
    PopulationConfig,
    RateRange,
    exploit_explore,
    initial_rates,
    lineage_schedule,
    segments,
)
from lightning_dropout.tune.pruning import MetricNotLoggedError, TrialPruning
from lightning_dropout.tune.records import (
    DUPLICATE,
    FAIL_ATTR,
    INTERRUPTED,
    METRICS_ATTR,
    PBT_ATTR,
    PBT_COPIED_ATTR,
    PBT_END_ATTR,
    PBT_GENERATION_ATTR,
    PBT_MEMBER_ATTR,
    PBT_RATES_ATTR,
    PBT_SETTINGS_ATTR,
    PBT_START_ATTR,
    PLAN_ATTR,
    SEGMENT_EPOCHS_ATTR,
    fail_stale,
)
from lightning_dropout.tune.runner import DuplicateTrialError, Tuner, fit
from lightning_dropout.tune.space import SearchGroup
from lightning_dropout.tune.value import trial_value
from lightning_dropout.variants import get_variant

__all__ = [
    "NOT_A_SEGMENT",
    "Population",
    "PopulationResult",
    "PopulationSpace",
    "Segment",
    "population_space",
    "run_population",
]

log = logging.getLogger(__name__)

NOT_A_SEGMENT = "no population segment was waiting (another worker took the last one); not run"
_MAX_ATTEMPTS = 3  # a segment killed this many times (no reason recorded) is given up


# -- the searched dimensions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PopulationSpace:
    """The sites of every member (each group at its first variant) and the rate dimension each belongs to."""

    base: DropoutPlan
    site_dims: dict[str, str]  # site key -> dimension
    ranges: dict[str, RateRange]  # dimension -> its range

    def plan(self, rates: Mapping[str, float]) -> DropoutPlan:
        """The plan of a member with ``rates`` (one per dimension)."""
        return self.base.with_rates({key: float(rates[dim]) for key, dim in self.site_dims.items()})

    def scheduled(self, schedule: Mapping[str, Sequence[tuple[int, float]]]) -> DropoutPlan:
        """The plan that follows ``schedule`` (per dimension, ``[(epoch, rate), ...]``) site by site."""
        return self.base.with_schedules({key: schedule[dim] for key, dim in self.site_dims.items()})


def population_space(
    groups: Sequence[SearchGroup], model: nn.Module, example_input: Any = None
) -> PopulationSpace:
    """The :class:`PopulationSpace` of ``groups`` on ``model``: one dimension per group (``hidden``), or per site
    of a ``per_layer`` group (``hidden/fc1``), as in the Optuna parameter names; every site at its group's first
    variant and that variant's first parameter choices. A site two groups select belongs to the later one."""
    dims: list[tuple[str, Any, RateRange]] = []
    for group in groups:
        variant = group.variants[0]
        if not get_variant(variant).schedulable:
            raise DropoutConfigError(
                f"`study.method: pbt` sets each site's rate while training, so the first variant of every group "
                f"must take a fixed rate, but group {group.name!r} starts with {variant!r}, which learns its own."
            )
        params = {k: v[0] for k, v in sorted(group.params.get(variant, {}).items())}
        span = RateRange(group.p[0], group.p[1], group.log)
        if group.per_layer:
            for target in group.targets(model, example_input):
                rule = group.rule(variant, group.probe_rate, params, only=target)
                dims.append((f"{group.name}/{target}", rule, span))
        else:
            dims.append((group.name, group.rule(variant, group.probe_rate, params), span))
    site_dims: dict[str, str] = {}
    for dim, rule, _ in dims:
        for site in resolve(model, [rule], example_input):
            site_dims[site.key] = dim
    base = resolve(model, [rule for _, rule, _ in dims], example_input)
    if not len(base):
        raise DropoutConfigError(
            "`study.method: pbt` needs dropout sites to set rates on, but the `dropout.groups` select none in "
            f"{type(model).__name__}."
        )
    site_dims = {s.key: site_dims[s.key] for s in base}
    ranges = {dim: span for dim, _, span in dims if dim in site_dims.values()}
    return PopulationSpace(base, site_dims, ranges)


# -- segments -------------------------------------------------------------------------------------------------
def label(generation: int, member: int) -> str:
    return f"pbt g{generation:03d} m{member:02d}"


@dataclass(frozen=True)
class Segment:
    """One member training from ``start_epoch`` to ``end_epoch`` with ``rates``, from the checkpoint ``start``
    (``None`` in generation 0) of member ``copied_from`` (itself unless it exploited)."""

    member: int
    generation: int
    start_epoch: int
    end_epoch: int
    rates: dict[str, float]
    start: str | None
    copied_from: int | None

    @property
    def label(self) -> str:
        return label(self.generation, self.member)

    def attrs(self) -> dict[str, Any]:
        return {
            PBT_ATTR: self.label,
            PBT_MEMBER_ATTR: self.member,
            PBT_GENERATION_ATTR: self.generation,
            SEGMENT_EPOCHS_ATTR: [self.start_epoch, self.end_epoch],
            PBT_RATES_ATTR: dict(self.rates),
            PBT_START_ATTR: self.start or "",
            PBT_COPIED_ATTR: -1 if self.copied_from is None else self.copied_from,
        }

    @classmethod
    def of(cls, trial: FrozenTrial | optuna.Trial) -> Segment | None:
        """The segment a trial runs (``None`` for a trial that is not one)."""
        attrs = trial.user_attrs
        if PBT_ATTR not in attrs:
            return None
        start, end = attrs[SEGMENT_EPOCHS_ATTR]
        copied = int(attrs[PBT_COPIED_ATTR])
        return cls(
            int(attrs[PBT_MEMBER_ATTR]),
            int(attrs[PBT_GENERATION_ATTR]),
            int(start),
            int(end),
            {k: float(v) for k, v in attrs[PBT_RATES_ATTR].items()},
            attrs[PBT_START_ATTR] or None,
            None if copied < 0 else copied,
        )


def _state(trials: Sequence[FrozenTrial]) -> tuple[str, FrozenTrial | None]:
    """The state of one segment label from its trials: ``done`` (its first complete trial), ``pending`` (waiting
    or running), ``dead`` (failed for a reason of its own, e.g. a NaN loss, or killed ``_MAX_ATTEMPTS`` times) or
    ``missing`` (never enqueued, interrupted by Ctrl-C, or killed: to enqueue again)."""
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    if complete:
        return "done", complete[0]
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return "pending", None
    failed = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(FAIL_ATTR) != DUPLICATE]
    reasons = [t for t in failed if t.user_attrs.get(FAIL_ATTR) not in (None, INTERRUPTED)]
    killed = [t for t in failed if t.user_attrs.get(FAIL_ATTR) is None]
    if reasons or len(killed) >= _MAX_ATTEMPTS:
        return "dead", (reasons or killed)[0]
    return "missing", None


def _segment_trials(study: optuna.Study) -> dict[tuple[int, int], list[FrozenTrial]]:
    out: dict[tuple[int, int], list[FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        segment = Segment.of(trial)
        if segment is not None:
            out.setdefault((segment.generation, segment.member), []).append(trial)
    return out


@dataclass
class PopulationResult:
    """The outcome of a population: per member its final value (``None``: failed), its lineage (the segments
    its final state went through, oldest first) and scheduled plan; the best member and its checkpoint."""

    values: list[float | None]
    lineages: list[list[Segment]]
    plans: list[DropoutPlan | None]
    best: int
    checkpoint: Path


class Population:
    """The population of one study in one worker process: the segments' decisions, running them, the result.

    Args:
        tuner: the study's :class:`~lightning_dropout.tune.runner.Tuner` (its config has ``study.method: pbt``).
    """

    def __init__(self, tuner: Tuner) -> None:
        self.tuner = tuner
        cfg = tuner.study_config
        self.cfg: PopulationConfig = cfg.population_config()
        max_epochs = tuner.cli.config["trainer"].get("max_epochs")
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
            raise DropoutConfigError(
                "`study.method: pbt` cuts training into segments of `trainer.max_epochs`, so it must be an integer "
                f">= 1, but got max_epochs={max_epochs!r}."
            )
        if tuner.multiprocess:
            raise DropoutConfigError(
                "`study.method: pbt` trains each segment in its worker's process, so the trainer must run in one "
                "process, but the config's strategy launches one per device (ddp); use `study.method: trials`."
            )
        self.max_epochs = max_epochs
        self.segments = segments(self.cfg, max_epochs)
        self.maximize = cfg.direction == "maximize"
        model = tuner.cli.fresh().model
        self.space = population_space(tuner.space.groups, model, getattr(model, "example_input_array", None))
        self.fatal: DropoutConfigError | None = None

    def settings(self) -> dict[str, Any]:
        """What the segments and decisions of a study depend on (stored on the study when it starts)."""
        ranges = {dim: [r.low, r.high, r.log] for dim, r in self.space.ranges.items()}
        seed = self.tuner.study_config.seed
        return {**self.cfg.to_dict(), "max_epochs": self.max_epochs, "seed": seed, "dimensions": ranges}

    def bind(self, study: optuna.Study) -> None:
        """Store :meth:`settings` on a new study; refuse to continue a study started with other settings, or one
        that holds trials of another method (its generations would not fit together)."""
        stored = study.user_attrs.get(PBT_SETTINGS_ATTR)
        settings = self.settings()
        if stored is None:
            others = [
                t.number
                for t in study.get_trials(deepcopy=False)
                if Segment.of(t) is None and t.user_attrs.get(FAIL_ATTR) != NOT_A_SEGMENT
            ]
            if others:
                raise DropoutConfigError(
                    f"`study.method: pbt` needs a study of its own, but study {study.study_name!r} already holds "
                    f"{len(others)} trials of `study.method: trials`; choose another `study.name`."
                )
            study.set_user_attr(PBT_SETTINGS_ATTR, settings)
        elif stored != settings:
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise DropoutConfigError(
                f"a population-based study resumes with the settings it started with, but {changed} differ from "
                f"those of study {study.study_name!r} ({ {k: stored.get(k) for k in changed} }); restore them or "
                "choose another `study.name`."
            )

    @property
    def size(self) -> int:
        return self.cfg.size

    @property
    def generations(self) -> int:
        return len(self.segments)

    def checkpoint(self, member: int, generation: int) -> Path:
        """Where member ``member`` saves its state at the end of ``generation``."""
        cfg = self.tuner.study_config
        return Path(cfg.run_dir) / cfg.name / "pbt" / f"member_{member:02d}" / f"gen_{generation:03d}.ckpt"

    # -- the decisions ---------------------------------------------------------------------------------------
    def generation(
        self, g: int, trials: Mapping[tuple[int, int], Sequence[FrozenTrial]]
    ) -> list[Segment] | None:
        """The segments of generation ``g`` (the one before must have finished), ``None`` when no member of the
        one before has a value (the population cannot go on)."""
        cfg = self.tuner.study_config
        start, end = self.segments[g]
        if g == 0:
            return [
                Segment(m, 0, start, end, initial_rates(self.space.ranges, m, cfg.seed), None, None)
                for m in range(self.size)
            ]
        values: list[float | None] = []
        rates: list[dict[str, float]] = []
        for m in range(self.size):
            state, trial = _state(trials.get((g - 1, m), []))
            before = trial if trial is not None else trials[(g - 1, m)][0]
            values.append(
                float(trial.value) if state == "done" and trial and trial.value is not None else None
            )
            rates.append(Segment.of(before).rates)  # type: ignore[union-attr]  # a segment's trial
        if all(v is None for v in values):
            return None
        choices = exploit_explore(values, rates, self.space.ranges, self.cfg, self.maximize, cfg.seed, g)
        return [
            Segment(m, g, start, end, c.rates, str(self.checkpoint(c.source, g - 1)), c.source)
            for m, c in enumerate(choices)
        ]

    def missing(self, study: optuna.Study) -> tuple[list[Segment], bool]:
        """The segments to enqueue now (of the first unfinished generation, those not in the study or to redo),
        and whether the population is finished (every generation done, or no member left)."""
        trials = _segment_trials(study)
        for g in range(self.generations):
            states = {m: _state(trials.get((g, m), []))[0] for m in range(self.size)}
            if all(s in ("done", "dead") for s in states.values()):
                continue
            lost = [m for m, s in states.items() if s == "missing"]
            if not lost:
                return [], False
            chosen = self.generation(g, trials)
            if chosen is None:
                return [], True
            return [chosen[m] for m in lost], False
        return [], True

    def enqueue(self, study: optuna.Study, missing: Sequence[Segment]) -> None:
        """Enqueue ``missing`` (deterministic labels: a twin enqueued by another process at the same moment is
        not run, see :func:`~lightning_dropout.tune.fixed.duplicate_of`); drop the checkpoints no segment can
        start from any more."""
        for segment in missing:
            study.enqueue_trial({}, user_attrs=segment.attrs(), skip_if_exists=False)
        if missing and missing[0].generation >= 2:
            for m in range(self.size):
                self.checkpoint(m, missing[0].generation - 2).unlink(missing_ok=True)

    def advance(self, study: optuna.Study) -> bool:
        """Enqueue what is missing; return whether the population is finished."""
        missing, finished = self.missing(study)
        self.enqueue(study, missing)
        return finished

    # -- one segment -----------------------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float:
        """Run the waiting segment ``trial`` (or refuse a trial that is none, or a duplicate)."""
        segment = Segment.of(trial)
        if segment is None:  # the last waiting segment was taken between our look and Optuna's pop
            trial.set_user_attr(FAIL_ATTR, NOT_A_SEGMENT)
            raise DuplicateTrialError(f"trial {trial.number}: {NOT_A_SEGMENT}")
        twin = duplicate_of(trial)
        if twin is not None:
            trial.set_user_attr(FAIL_ATTR, DUPLICATE)
            raise DuplicateTrialError(f"trial {trial.number} duplicates trial {twin}; not run")
        try:
            return self.train_segment(trial, segment)
        except KeyboardInterrupt:
            trial.set_user_attr(FAIL_ATTR, INTERRUPTED)  # enqueued again when the study resumes
            raise
        except Exception as err:
            if unwritable(err) is not None:  # a full disk: every later segment would fail alike (runner.py)
                self.fatal = self.tuner.unwritable_error(err)
                raise
            trial.set_user_attr(FAIL_ATTR, f"{type(err).__name__}: {err}"[:2000])
            if isinstance(err, MetricNotLoggedError):
                self.fatal = err
            else:
                log.warning(
                    "segment %s failed: %s", segment.label, redact(f"{type(err).__name__}: {err}")[:300]
                )
            raise

    def train_segment(self, trial: optuna.Trial, segment: Segment) -> float:
        """Train ``segment`` and return its value; its plan, metrics and end checkpoint go on the trial."""
        tuner, cfg = self.tuner, self.tuner.study_config
        if segment.start is not None and not Path(segment.start).is_file():
            raise FileNotFoundError(
                f"segment {segment.label} starts from {segment.start}, which is missing; every worker must see "
                "`study.run_dir` (on several machines, a shared filesystem)"
            )
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        pruning = TrialPruning(trial, cfg.metric, cfg.direction, prunable=False)
        groups = tuner.space.groups

        def choose(model: nn.Module) -> DropoutPlan:
            return population_space(groups, model, getattr(model, "example_input_array", None)).plan(
                segment.rates
            )

        injector = DropoutInjector(plan=choose, dropout_seed=cfg.dropout_seed)
        last = segment.generation == self.generations - 1
        loggers = trial_loggers(
            tuner.logger_specs, Path(cfg.run_dir), cfg.name, f"member_{segment.member:02d}"
        )
        cli = tuner.cli.fresh(
            [injector, pruning],
            logger=loggers or False,
            enable_progress_bar=False,
            enable_model_summary=False,
            max_epochs=segment.end_epoch,
        )
        value: float | None = None
        try:
            end = self.checkpoint(segment.member, segment.generation)
            end.parent.mkdir(parents=True, exist_ok=True)
            part = end.with_name(f"{end.name}.part")  # a killed save leaves no half checkpoint under the name
            fit(cli, ckpt_path=segment.start)
            with quiet_lightning():
                cli.trainer.save_checkpoint(part, weights_only=False)
            os.replace(part, end)
            metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
            value = trial_value(pruning.history, cfg.value, pruning.maximize, cfg.value_window)
            metrics["value"] = value
            assert injector.plan is not None  # set in setup()
            trial.set_user_attr(PLAN_ATTR, injector.plan.to_yaml())
            trial.set_user_attr(METRICS_ATTR, metrics)
            trial.set_user_attr(PBT_END_ATTR, str(end))
        finally:
            if last:
                state = "failed" if value is None or math.isnan(value) else "complete"
                params: dict[str, Any] = {"trial": trial.number, "kind": "pbt", "member": segment.member}
                params["state"] = state
                params.update(
                    plan_hparams(injector.plan or DropoutPlan(), tuner.hparam_columns(cli.model).sites)
                )
                finish_loggers(loggers, params, {"hp/value": math.nan if value is None else value})
            else:
                _close(loggers)
        if math.isnan(value):
            raise FloatingPointError(f"`{cfg.metric}` was NaN: the training diverged")
        return value

    # -- the result ------------------------------------------------------------------------------------------
    def result(self, study: optuna.Study) -> PopulationResult | None:
        """The members' final values and lineages and the best member (``None`` if no member finished)."""
        trials = _segment_trials(study)
        last = self.generations - 1
        values: list[float | None] = []
        lineages: list[list[Segment]] = []
        plans: list[DropoutPlan | None] = []
        for m in range(self.size):
            state, trial = _state(trials.get((last, m), []))
            ok = state == "done" and trial is not None and trial.value is not None
            values.append(float(trial.value) if ok and trial is not None else None)  # type: ignore[arg-type]
            lineage = self.lineage(trials, m) if ok else []
            lineages.append(lineage)
            steps = [(s.start_epoch, s.rates) for s in lineage]
            plans.append(self.space.scheduled(lineage_schedule(steps)) if lineage else None)
        alive = [m for m in range(self.size) if values[m] is not None]
        if not alive:
            return None
        sign = -1.0 if self.maximize else 1.0
        best = min(alive, key=lambda m: (sign * float(values[m]), m))  # type: ignore[arg-type]
        return PopulationResult(values, lineages, plans, best, self.checkpoint(best, last))

    def lineage(self, trials: Mapping[tuple[int, int], Sequence[FrozenTrial]], member: int) -> list[Segment]:
        """The segments member ``member``'s final state went through, oldest first (following its copies)."""
        out: list[Segment] = []
        current: int | None = member
        for g in range(self.generations - 1, -1, -1):
            assert current is not None
            state, trial = _state(trials.get((g, current), []))
            if state != "done" or trial is None:
                raise RuntimeError(f"segment {label(g, current)} of a finished lineage is {state}")
            segment = Segment.of(trial)
            assert segment is not None
            out.append(segment)
            current = segment.copied_from
        return out[::-1]


def _close(loggers: Sequence[Logger]) -> None:
    """Close a segment's loggers without the run's HParams record (written once, by the member's last segment)."""
    for logger in loggers:
        if isinstance(logger, TrialLogger):
            TensorBoardLogger.finalize(logger, "success")


def _waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def run_population(tuner: Tuner, study: optuna.Study | None = None, poll: float = 0.5) -> None:
    """One worker of a PBT study: enqueue what the population needs, run waiting segments, and wait for the
    other workers' segments, until every generation has finished (or ``study.timeout`` seconds have passed)."""
    cfg = tuner.study_config
    tuner.pin_threads()
    # a segment resumes a checkpoint trained with other rates on purpose: the injector's warning says nothing here
    warnings.filterwarnings("ignore", message=".*the checkpoint was trained with dropout plan")
    study = study if study is not None else tuner.study()
    population = Population(tuner)
    population.bind(study)
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    while not population.advance(study):
        if deadline is not None and time.monotonic() > deadline:
            return
        if _waiting(study):
            # Ctrl-C stops a training, not Optuna's bookkeeping (tune/ctrl_c.py); a full disk stops the run
            with ctrl_c.held(), tuner.stopping_on_full_disk():
                study.optimize(population.objective, n_trials=1, catch=(Exception,))
            if population.fatal is not None:
                raise population.fatal
            continue
        fail_stale(study)  # a killed worker's segment: failed, then retried
        time.sleep(poll)
