"""The study's storage schema in one place: the trial attributes a study writes, opening storages and studies,
and reading the results back (the stored plan of a trial, the re-run candidates, the winner). ``tune``, ``best``,
``report`` and the TensorBoard records all read a study through this module; it needs nothing but the storage.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
import yaml
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.redaction import redact, remember
from lightning_dropout.tune.selection import NO_DROPOUT, Candidate, choose_winner, rank_candidates

__all__ = [
    "BASELINE_AS_WRITTEN",
    "BASELINE_ATTR",
    "BASELINE_NONE",
    "CONFIG_ATTR",
    "CONFIG_SUMMARY_PREFIX",
    "DUPLICATE",
    "ENQUEUED_ATTR",
    "ENQUEUED_PARAMS_ATTR",
    "EPOCHS_ATTR",
    "FAIL_ATTR",
    "FIXED_PLAN_ATTR",
    "INTERRUPTED",
    "METRICS_ATTR",
    "METRIC_ATTR",
    "NOTHING_TRAINED",
    "PARENT_RUNS_ATTR",
    "PBT_ATTR",
    "PBT_COPIED_ATTR",
    "PBT_END_ATTR",
    "PBT_GENERATION_ATTR",
    "PBT_MEMBER_ATTR",
    "PBT_RATES_ATTR",
    "PBT_RESULT_ATTR",
    "PBT_SETTINGS_ATTR",
    "PBT_START_ATTR",
    "PLAN_ATTR",
    "RERUNS_ATTR",
    "RERUN_VALUE_PREFIX",
    "SEARCH_ATTR",
    "SEGMENT_EPOCHS_ATTR",
    "STEPS_METRIC",
    "VALUE_RULE_ATTR",
    "WARM_START_ATTR",
    "WINNER_LABEL_ATTR",
    "WINNER_RULE_ATTR",
    "WINNER_TRIAL_ATTR",
    "WINNER_VALUES_ATTR",
    "candidates",
    "config_summary",
    "counts",
    "fail_stale",
    "finished_trials",
    "fixed_label",
    "name_objective",
    "open_storage",
    "open_study",
    "plan_amount",
    "record_winner",
    "repeated_failure",
    "rerun_candidates",
    "retried",
    "storage_file",
    "stored_plan",
    "study_metric",
    "trial_label",
    "value_rule",
    "winner",
    "winner_rule",
    "winner_trial",
    "winning_config",
]

# study attributes `tune` writes when it opens the study, which `best`, `report` and the figures read back
METRIC_ATTR = "metric"  # the metric the study optimizes (`study.metric`)
WINNER_RULE_ATTR = "winner_rule"  # how the race picks the winner (`study.winner`)
VALUE_RULE_ATTR = "value"  # how a trial's value summarizes its curve (`study.value`)
BASELINE_ATTR = "baseline"
WARM_START_ATTR = "warm_start"  # the label of a warm-start trial ("uniform p=0.2")
ENQUEUED_ATTR = "enqueued"  # the label of a trial from `study.enqueue` ("enqueued #1")
FIXED_PLAN_ATTR = "fixed_plan"  # the plan (YAML) of an enqueued plan: trained as is, nothing sampled
PLAN_ATTR = "plan"
METRICS_ATTR = "metrics"
EPOCHS_ATTR = (
    "epochs_trained"  # trial attribute: the epochs the trial trained (the study's compute, tune/budget.py)
)
FAIL_ATTR = "fail_reason"
CONFIG_ATTR = (
    "config"  # study attribute: the study's config as YAML (passwords redacted), for `best --config-out`
)
# study attributes "config/<section>": one readable line per section of that config (what optuna-dashboard shows)
CONFIG_SUMMARY_PREFIX = "config/"
# study attributes set when `tune` ends: the winner in Optuna's terms (its trial number, its label, its re-run
# values per seed or its single trial value), next to Optuna's own best trial
WINNER_TRIAL_ATTR = "winner_trial"
WINNER_LABEL_ATTR = "winner_label"
WINNER_VALUES_ATTR = "winner_values"
SEARCH_ATTR = "search"  # trial attribute: {dotted config key: the value the run used} (`search:`)
RERUNS_ATTR = "reruns"  # study attribute: {trial number: {label, values, seeds, amount}}
# study attributes "rerun_value:<trial>:<seed index>": one re-run's value, written by whichever worker ran it
# (one key per run, so workers never overwrite each other's), gathered into RERUNS_ATTR by `tune`
RERUN_VALUE_PREFIX = "rerun_value:"
ENQUEUED_PARAMS_ATTR = "fixed_params"  # Optuna's own system attribute: the parameters `enqueue_trial` fixed
# population-based training: each trial is one member's segment of generations (tune/pbt.py)
PBT_MEMBER_ATTR = "pbt_member"
PBT_GENERATION_ATTR = "pbt_generation"
PBT_RATES_ATTR = "pbt_rates"  # {dimension: rate} of the segment
PBT_START_ATTR = "pbt_start"  # the checkpoint it starts from ("" in generation 0)
PBT_COPIED_ATTR = (
    "pbt_copied_from"  # the member whose checkpoint it continues (itself unless it exploited; -1 at 0)
)
PBT_END_ATTR = "pbt_checkpoint"  # the checkpoint it saved (set when it completes)
PBT_SETTINGS_ATTR = "pbt_settings"  # study attribute: Population.settings() of the study's first run
# study attribute: {index of the logger in `trainer.logger`: the study's parent run id} (MLflow)
PARENT_RUNS_ATTR = "logger_parent_runs"
INTERRUPTED = "interrupted (Ctrl-C)"
DUPLICATE = "a duplicate of an earlier trial with the same label (two processes enqueued it at once); not run"
BASELINE_NONE = NO_DROPOUT
BASELINE_AS_WRITTEN = "as written"
SEGMENT_EPOCHS_ATTR = "pbt_epochs"  # trial attribute of a PBT segment: its [start, end) epochs
PBT_ATTR = "pbt"  # the label of a population-based training segment ("pbt g003 m01"; tune/pbt.py)
# study attribute: the result of population-based training ({label, plan: the scheduled plan's YAML, ...})
PBT_RESULT_ATTR = "pbt_result"
STEPS_METRIC = "train_steps"  # a trial's metric: the optimizer steps it ran (0: it trained nothing)
NOTHING_TRAINED = (
    "no training step ran: `trainer.max_epochs`, `max_steps` or `limit_train_batches` leave nothing to train"
)
REPEATS = 3  # failures alike, with no trial complete, after which a study stops (`repeated_failure`)
_OPEN_TRIES = 6  # creating the tables of a fresh database: the tries when several processes race
HEARTBEAT_INTERVAL = 10  # seconds; a trial whose heartbeat is older than 2x this is failed and retried


def fail_stale(study: optuna.Study) -> None:
    """Fail the study's trials whose heartbeat went stale (a killed process's), so Optuna queues their retries;
    without the warning Optuna's still-experimental heartbeat API prints on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def study_metric(study: optuna.Study) -> str:
    """The metric the study optimizes, as `tune` recorded it (``value`` for a study made elsewhere)."""
    return str(study.user_attrs.get(METRIC_ATTR, "value"))


def winner_rule(study: optuna.Study) -> str:
    """How the study's race picks its winner, as `tune` recorded it (``one_se`` by default)."""
    return str(study.user_attrs.get(WINNER_RULE_ATTR, "one_se"))


def value_rule(study: optuna.Study) -> str | None:
    """How a trial's value summarizes its curve (``study.value``), if `tune` recorded it."""
    rule = study.user_attrs.get(VALUE_RULE_ATTR)
    return str(rule) if rule else None


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a finished trial counts towards ``n_trials``: complete, pruned, or failed for a reason other
    than Ctrl-C (re-run when the study resumes) or being a duplicate (never run)."""
    return trial.state.is_finished() and trial.user_attrs.get(FAIL_ATTR) not in (INTERRUPTED, DUPLICATE)


def repeated_failure(study: optuna.Study, repeats: int = REPEATS) -> str | None:
    """The reason of the failures when no trial completed and the last ``repeats`` finished trials all failed
    with that same reason (a broken config, not a plan that diverged): every further trial would fail alike.
    ``None`` otherwise.

    Example:
        >>> study = optuna.create_study()
        >>> for _ in range(3):
        ...     trial = study.ask()
        ...     trial.set_user_attr(FAIL_ATTR, "ValueError: bad")
        ...     _ = study.tell(trial, state=optuna.trial.TrialState.FAIL)
        >>> repeated_failure(study)
        'ValueError: bad'
    """
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.COMPLETE for t in trials):
        return None
    tail = [t for t in trials if counts(t)][-repeats:]
    reasons = {str(t.user_attrs.get(FAIL_ATTR)) for t in tail if t.state == TrialState.FAIL}
    if len(tail) < repeats or len(reasons) != 1 or any(t.state != TrialState.FAIL for t in tail):
        return None
    reason = reasons.pop()
    return None if reason == "None" or "the training diverged" in reason else reason


def retried(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """The numbers of the trials that failed and were run again: a trial whose process was killed is failed by
    the storage's heartbeat and re-queued as a copy (Optuna's ``retry_history``); the copy is the one that
    counts."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def finished_trials(study: optuna.Study) -> int:
    """The number of trials that count towards ``n_trials`` (:func:`counts`; a retried failure counts once, as
    its retry)."""
    trials = study.get_trials(deepcopy=False)
    again = retried(trials)
    return sum(counts(t) and t.number not in again for t in trials)


def fixed_label(trial: optuna.trial.FrozenTrial | optuna.Trial) -> str | None:
    """The label of a trial enqueued before the sampler (a baseline, a warm-start point, a user's enqueued
    trial), ``None`` for a sampled one."""
    for attr in (BASELINE_ATTR, WARM_START_ATTR, ENQUEUED_ATTR, PBT_ATTR):
        if attr in trial.user_attrs:
            return str(trial.user_attrs[attr])
    return None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: ``sqlite:///``, ``postgresql://``, ``mysql://`` (with heartbeat and retry
    of stale trials) or ``journal:PATH`` (journal file; no heartbeat)."""
    remember(url)  # every process that opens it hides its password, whatever its characters
    if url.startswith("journal:"):
        return _journal(url)
    if _in_memory_sqlite(url):
        raise DropoutConfigError(
            f"`study.storage` must be a database that outlives `tune` and that every worker can open, but "
            f"{redact(url)!r} is an in-memory SQLite database; choices: sqlite:///PATH.db, postgresql://..., "
            "journal:PATH, or no `storage` for the run directory's SQLite file."
        )
    if url.startswith("sqlite:///"):
        try:
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DropoutConfigError(
                f"`study.storage` must be a database this machine can open, but {redact(url)!r} is not: "
                f"{(err.strerror or type(err).__name__).lower()}."
            ) from None
    if not any(url.startswith(s) for s in ("sqlite:", "postgresql", "mysql")):
        raise DropoutConfigError(
            f"`study.storage` must be a sqlite:///, postgresql://, mysql:// or journal: URL, "
            f"but got {redact(url)!r}."
        )
    for attempt in range(_OPEN_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat API
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=2 * HEARTBEAT_INTERVAL,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=2
                    ),
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            # several workers or machines creating Optuna's tables in an empty database at the same moment:
            # one wins (PostgreSQL: a duplicate type; SQLite: "table ... already exists" or a locked file),
            # the others find the tables on the next try
            racing = isinstance(err, sqlalchemy.exc.IntegrityError) or any(
                text in str(err) for text in ("already exists", "database is locked")
            )
            if not racing or attempt == _OPEN_TRIES - 1:
                raise DropoutConfigError(
                    f"`study.storage` must be a database this machine can open, but {redact(url)!r} failed: "
                    f"{type(err).__name__}: {redact(str(err)).splitlines()[0]}"
                ) from None
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
        except (ImportError, sqlalchemy.exc.ArgumentError) as err:
            raise DropoutConfigError(
                f"`study.storage` must be a database this machine can open, but {redact(url)!r} failed: "
                f"{type(err).__name__}: {redact(str(err)).splitlines()[0]}"
            ) from None
    raise DropoutConfigError(
        f"`study.storage` {redact(url)!r} could not be initialized after {_OPEN_TRIES} tries."
    )


def _journal(url: str) -> optuna.storages.BaseStorage:
    """A journal-file storage for ``journal:PATH``: a regular file (created with its folder if missing)."""
    path = Path(url[len("journal:") :])
    problem = None
    if not path.name:
        problem = "it names no file"
    elif path.exists() and not path.is_file():
        problem = "it is not a regular file"
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            problem = (err.strerror or type(err).__name__).lower()
    raise DropoutConfigError(
        f"`study.storage` must be a journal file this machine can write, but {redact(url)!r} is not: {problem}."
    )


def _in_memory_sqlite(url: str) -> bool:
    """Whether ``url`` is an in-memory SQLite database (gone when the process ends, one per connection)."""
    return url.split("?", 1)[0] in ("sqlite:", "sqlite:/", "sqlite://", "sqlite:///", "sqlite:///:memory:")


def storage_file(url: str) -> Path | None:
    """The local file a ``sqlite:///`` or ``journal:`` URL names (``None`` for a database server or an in-memory
    SQLite)."""
    if url.startswith("journal:"):
        return Path(url[len("journal:") :])
    if url.startswith("sqlite:///") and not _in_memory_sqlite(url):
        return Path(url[len("sqlite:///") :].split("?", 1)[0])
    return None


def open_study(name: str, storage: str) -> optuna.Study:
    """Load an existing study (for ``best`` and ``report``). A storage file that does not exist is refused
    before anything opens it, so a mistyped name or path never leaves an empty database behind."""
    file = storage_file(storage)
    if file is not None and not file.is_file():
        raise DropoutConfigError(
            f"`study` must name a study in an existing storage, but {redact(storage)!r} does not exist "
            f"({file} is not a file), so it holds no study {name!r}; give the tuning config "
            "(`lightning-dropout best CONFIG.yaml`) or its `--storage`."
        )
    opened = open_storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=opened)
    except KeyError:
        names = optuna.get_all_study_names(opened)
        raise DropoutConfigError(
            f"`study` must name a study in {redact(storage)}, but got {name!r}; studies there: {names}."
        ) from None


def name_objective(study: optuna.Study, metric: str) -> None:
    """Name the study's objective after the metric it optimizes (``study.set_metric_names``), so Optuna's own
    tools (optuna-dashboard, ``study.trials_dataframe()``) show ``val_acc`` rather than ``value``."""
    if study.metric_names != [metric]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])


def stored_plan(trial: optuna.trial.FrozenTrial) -> DropoutPlan:
    return DropoutPlan.from_yaml(trial.user_attrs.get(PLAN_ATTR) or "sites: []")


def trial_label(trial: optuna.trial.FrozenTrial) -> str:
    for attr in (BASELINE_ATTR, WARM_START_ATTR, ENQUEUED_ATTR, PBT_ATTR):
        if trial.user_attrs.get(attr):
            return str(trial.user_attrs[attr])
    return f"trial {trial.number}"


def candidates(study: optuna.Study, top_k: int) -> list[optuna.trial.FrozenTrial]:
    """The trials re-run over seeds: the ``top_k`` best completed trials (by trial value) other than the
    warm-start grid's, the best point of the warm-start grid and the baselines. A grid point that leads the
    trials is re-run as the grid's best, and the best other plans still get their ``top_k`` places: the re-runs
    then test whether anything beats the grid."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(
        (t for t in done if BASELINE_ATTR not in t.user_attrs),
        key=lambda t: float(t.value or 0),
        reverse=reverse,
    )
    chosen = [t for t in ranked if WARM_START_ATTR not in t.user_attrs][:top_k]
    grid = [t for t in ranked if WARM_START_ATTR in t.user_attrs]
    if grid:
        chosen.append(grid[0])
    return chosen + [t for t in done if BASELINE_ATTR in t.user_attrs]


def plan_amount(plan: DropoutPlan) -> float:
    """The total dropout of a plan, the "simplest" order of the ``one_se`` rule: the sum of its rates."""
    return sum(s.p for s in plan)


def rerun_candidates(study: optuna.Study) -> list[Candidate]:
    """The study's re-run candidates, as stored, best mean first."""
    out = []
    for number, info in (study.user_attrs.get(RERUNS_ATTR) or {}).items():
        plan = stored_plan(study.trials[int(number)])
        amount = float(info.get("amount", plan_amount(plan)))
        values = [float(v) for v in info["values"]]
        dropped = info.get("dropped_after")
        out.append(Candidate(info["label"], int(number), plan, values, amount, info.get("seeds"), dropped))
    return rank_candidates(out, study.direction == optuna.study.StudyDirection.MAXIMIZE)


def _chosen(study: optuna.Study) -> Candidate | None:
    """The re-run candidate the study's winner rule (``study.winner``) picks; ``None`` without re-runs."""
    reruns = rerun_candidates(study)
    if not reruns:
        return None
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return choose_winner(reruns, maximize, winner_rule(study))


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise DropoutConfigError(
            f"study {study.study_name!r} must have a completed trial, but has none."
        ) from None


def winner_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial whose plan :func:`winner` returns."""
    chosen = _chosen(study)
    if chosen is None:
        return _best_trial(study)
    return next(t for t in study.get_trials(deepcopy=False) if t.number == chosen.trial)


def winner(study: optuna.Study) -> tuple[DropoutPlan, str]:
    """The best plan of a study: chosen by the study's winner rule (``study.winner``) among the re-run
    candidates when there are any, else the best single trial; for population-based training, the rate schedule
    its best member followed."""
    population = study.user_attrs.get(PBT_RESULT_ATTR)
    if population:
        return DropoutPlan.from_yaml(population["plan"]), str(population["label"])
    chosen = _chosen(study)
    if chosen is not None:
        n = len(chosen.values)
        return chosen.plan, f"{chosen.label} (mean over {n} seed{'' if n == 1 else 's'})"
    trial = _best_trial(study)
    return stored_plan(trial), trial_label(trial)


def winning_config(study: optuna.Study, plan_path: str | Path) -> str:
    """The study's config (as ``tune`` stored it) with the winner's ``search:`` values set and ``plan:`` pointing
    at its plan file: ``lightning-dropout fit`` on it trains the winner. The ``search:`` section is dropped (its
    values are now fixed); passwords stay redacted."""
    text = study.user_attrs.get(CONFIG_ATTR)
    if not text:
        raise DropoutConfigError(
            f"study {study.study_name!r} must hold its config to write one, but it has none (it was created "
            "before studies stored their config); write the plan with --out and apply it with `fit --plan`."
        )
    config = yaml.safe_load(text)
    for key, value in (winner_trial(study).user_attrs.get(SEARCH_ATTR) or {}).items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    config.pop("search", None)
    config["plan"] = str(plan_path)
    return yaml.safe_dump(config, sort_keys=False)


_NOTE_MARK = "<!-- lightning-dropout: winner -->"  # a study note that starts with it is ours to rewrite


def record_winner(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """Store the winner (:func:`winner`) where Optuna's own tools look: the study attributes ``winner_trial``
    (its number), ``winner_label`` and ``winner_values`` (its re-run values, one per seed, or its single trial
    value; a NaN as ``null``), and, when optuna-dashboard is installed, the study's note saying why it may
    differ from the dashboard's "Best Trial". A note someone wrote by hand is left alone. Returns the winner."""
    chosen = _chosen(study)
    trial = winner_trial(study)
    _, label = winner(study)
    values = list(chosen.values) if chosen is not None else [trial.value]
    for key, value in (
        (WINNER_TRIAL_ATTR, trial.number),
        (WINNER_LABEL_ATTR, label),
        (WINNER_VALUES_ATTR, [None if v is None or math.isnan(v) else float(v) for v in values]),
    ):
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    try:
        from optuna_dashboard import get_note, save_note  # a dev extra: without it the attributes say it all
    except ImportError:
        return trial
    current = get_note(study)
    if not current or current.startswith(_NOTE_MARK):
        note = _winner_note(study, trial, label, chosen)
        if note != current:
            save_note(study, note)
    return trial


def _winner_note(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, label: str, chosen: Candidate | None
) -> str:
    """The study note (Markdown) on the winner and Optuna's best trial."""
    metric = study_metric(study)
    rule = winner_rule(study)
    best = _best_trial(study)
    heading = label if label.startswith(f"trial {trial.number} ") else f"trial {trial.number}, {label}"
    lines = [_NOTE_MARK, f"## Winner: {heading}", ""]
    if chosen is None:
        lines.append(
            f"No re-runs over seeds (`study.seeds` < 2, or a budget too small for one round of them): the "
            "winner is the best single trial, "
            f"{metric} {trial.value:.4f}, as Optuna's Best Trial."
        )
        return "\n".join(lines) + "\n"
    how = (
        "the plan with the least dropout whose mean is within one standard error of the best mean"
        if rule == "one_se"
        else "the plan with the best mean"
    )
    lines += [
        f"lightning-dropout raced the best trials and the references over the same fresh seeds (paired; "
        f"the winner has {len(chosen.values)}; a candidate a paired test found worse got no more) and chose by "
        f"`study.winner: {rule}`: {how}.",
        "",
        f"Optuna's **Best Trial** is the best *single* run: trial {best.number} ({metric} {best.value:.4f}, one "
        "seed). "
        + (
            "Here it is the winner too."
            if best.number == trial.number
            else "The winner differs: one run varies with its seed by about as much as plans differ, so "
            "lightning-dropout goes by the mean over the paired seeds, and prefers less dropout when the "
            "means are within the noise."
        ),
        "",
        f"| trial | plan | mean {metric} | seeds |",
        "|---|---|---|---|",
    ]
    for candidate in rerun_candidates(study):
        mark = " (winner)" if candidate.trial == trial.number else ""
        mean = "nan" if math.isnan(candidate.mean) else f"{candidate.mean:.4f}"
        lines.append(f"| {candidate.trial} | {candidate.label}{mark} | {mean} | {len(candidate.values)} |")
    lines += ["", "The study attributes `winner_trial`, `winner_label` and `winner_values` hold the same."]
    return "\n".join(lines) + "\n"


def config_summary(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, str]:
    """One readable line per section of a study's ``config`` (a parsed config mapping, passwords already
    redacted), keyed ``config/<section>``: a class as ``class_path(key=value, ...)``, a mapping as its
    ``key=value`` pairs that differ from ``defaults`` (the parser's defaults, same shape), anything else as
    YAML flow. Sections equal to their default are left out; each line is cut at 1000 characters."""
    out = {}
    for section, value in config.items():
        default = defaults.get(section)
        if value == default or section in ("config", "ckpt_path", "__path__"):
            continue
        text = _brief(value, default if isinstance(default, Mapping) else {})
        if text:
            out[f"{CONFIG_SUMMARY_PREFIX}{section}"] = text if len(text) <= 1000 else text[:997] + "..."
    return out


def _flow(value: Any) -> str:
    if isinstance(value, Mapping) and "class_path" in value:
        args = value.get("init_args") or {}
        inner = ", ".join(f"{k}={_flow(v)}" for k, v in args.items()) if isinstance(args, Mapping) else ""
        return f"{value['class_path']}({inner})"
    if isinstance(value, list) and any(isinstance(v, Mapping) and "class_path" in v for v in value):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _brief(value: Any, default: Mapping[str, Any]) -> str:
    if isinstance(value, Mapping) and "class_path" not in value:
        return ", ".join(f"{k}={_flow(v)}" for k, v in value.items() if default.get(k, object()) != v)
    return _flow(value)
