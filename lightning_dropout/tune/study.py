"""``tune`` end to end, with a Rich progress bar and the final table (used by the CLI; no argv here)."""

from __future__ import annotations

import datetime
import itertools
import logging
import shlex
import threading
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from lightning_dropout.errors import DropoutConfigError, Interrupted
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.redaction import redact
from lightning_dropout.tune.budget import BudgetPlan, compute_used, rerun_runs
from lightning_dropout.tune.config import STORAGE_ENV, StudyConfig, resolve_storage
from lightning_dropout.tune.launched import Channel, launched_rank
from lightning_dropout.tune.loggers import publish_study, uses_tensorboard
from lightning_dropout.tune.pbt_command import tune_population
from lightning_dropout.tune.records import (
    DUPLICATE,
    FAIL_ATTR,
    INTERRUPTED,
    PLAN_ATTR,
    RERUNS_ATTR,
    SEARCH_ATTR,
    finished_trials,
    fixed_label,
    record_winner,
    repeated_failure,
    stored_plan,
    winner,
)
from lightning_dropout.tune.report import comparison_rows, output_console, plan_summary, write_study_images
from lightning_dropout.tune.reruns import rerun_jobs
from lightning_dropout.tune.retrain import winner_lines
from lightning_dropout.tune.runner import Tuner
from lightning_dropout.tune.selection import (
    Candidate,
    choose_winner,
    compare,
    paired_gain,
    references,
)
from lightning_dropout.tune.workers import Workers

__all__ = ["plan_summary", "results_table", "study_command", "trial_line", "tune", "verdict"]

log = logging.getLogger(__name__)


def _status(study: optuna.Study) -> tuple[int, int, int, str]:
    trials = study.get_trials(deepcopy=False)
    done = finished_trials(study)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    failed = sum(t.state == TrialState.FAIL and t.user_attrs.get(FAIL_ATTR) != DUPLICATE for t in trials)
    try:
        best = f"{study.best_value:.4f}"
    except ValueError:
        best = "-"
    return done, pruned, failed, best


def tune(
    args: Sequence[str], console: Console | None = None
) -> tuple[DropoutPlan | None, list[Candidate], Path | None]:
    """Run (or resume) the study of the config ``args``; return the winning plan, the re-run table and the path
    the plan was written to (``None`` and ``None`` when no trial completed, e.g. all were pruned or failed)."""
    console = console or output_console(stderr=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # progress bar, table, one line per failed trial
    tuner = Tuner(args)
    rank = launched_rank(tuner)
    if rank is None:
        return _tune(tuner, args, console)
    # torchrun/srun started every rank of a multi-node trainer: rank 0 runs the study, the others follow it
    channel = Channel(tuner)
    if rank != 0:
        channel.follow(tuner)
        channel.close()
        return None, [], None
    tuner.channel = channel
    # on an error this rank exits without a word to the others: the launcher then stops them (they may be
    # waiting in a training's collective, not for a job)
    outcome = _tune(tuner, args, console)
    channel.send({"kind": "stop"})
    channel.close()
    return outcome


def _tune(
    tuner: Tuner, args: Sequence[str], console: Console
) -> tuple[DropoutPlan | None, list[Candidate], Path | None]:
    layout = tuner.place_workers()  # `workers: auto`, each worker's GPUs: fail before the study opens
    cfg = tuner.study_config
    study = tuner.study()
    if cfg.method == "pbt":  # population-based training: its own segments, no baselines or re-runs
        outcome = tune_population(tuner, study, console)
        output_console().print(compute_line(tuner, study))
        return outcome
    tuner.enqueue_fixed(study)
    budget = tuner.budget
    size = f"{cfg.n_trials} trials" if budget is None else f"a budget of {budget.budget:g} trainings"
    console.print(
        f"study [bold]{cfg.name}[/] in {redact(cfg.storage_url())}: {cfg.metric} ({cfg.direction}), "
        f"{size}, {cfg.workers} worker(s)" + (f" on {layout.describe()}" if layout.sets else "")
    )
    images = Path(cfg.run_dir) / cfg.name / "study"
    with Workers(tuner) as workers:
        _run_trials(workers, study, console)
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            write_study_images(study, images)  # e.g. the intermediate values of pruned trials
            done, pruned, failed, _ = _status(study)
            reason = repeated_failure(study)
            if reason is not None:  # a config reason: the study stopped after the first trials it failed
                raise DropoutConfigError(
                    f"every trial failed for the same reason, so the study stopped after {failed}: {reason}"
                )
            if not pruned:  # it trained nothing to a value: not a success
                last = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL][-1:]
                why = f"; the last failure: {last[0].user_attrs.get(FAIL_ATTR)}" if last else ""
                raise DropoutConfigError(f"no trial completed ({failed} failed of {done}){why}")
            console.print(
                f"no trial completed ({pruned} pruned, {failed} failed of {done}): no best plan to write."
            )
            return None, [], None
        ranked: list[Candidate] = []
        if (cfg.seeds or 0) > 1:
            with console.status("re-running the best plans over seeds (a race)") as status:
                ranked = workers.rerun(
                    study, on_done=lambda msg: status.update(rerun_status(study, cfg, msg, tuner.budget))
                )
    plan, label = winner(study)
    record_winner(study)  # Optuna's own record: study attributes winner_*, optuna-dashboard's study note
    path = plan.save(Path(cfg.run_dir) / cfg.name / "best_plan.yaml")
    write_study_images(study, images)
    publish_study(tuner.logger_specs, study, path)  # MLflow: the study's parent run
    results = output_console()  # the result goes to stdout; progress and status to stderr
    maximize = cfg.direction == "maximize"
    if ranked:
        results.print(results_table(ranked, cfg.metric, maximize, cfg.winner))
        for line in verdict(ranked, maximize, cfg.winner, cfg.metric):
            results.print(line)
    else:
        results.print(f"best trial: {label}")
    results.print(f"winner: {label}; plan written to {path}")
    results.print(compute_line(tuner, study))
    report = study_command("report", cfg, tuner.args)
    if uses_tensorboard(tuner.logger_specs):
        results.print(
            f"TensorBoard: tensorboard --logdir {Path(cfg.run_dir) / cfg.name} (study figures under IMAGES, run "
            f"`study`); HTML report: {report}"
        )
    else:
        results.print(f"runs logged to the config's trainer.logger; HTML report: {report}")
    for line in winner_lines(args, study, path):  # its searched values (written beside the plan), the command
        results.print(line, markup=False, highlight=False, soft_wrap=True)
    return plan, ranked, path


def _done(study: optuna.Study, budget: BudgetPlan | None) -> float:
    """The progress bar's count: trainings used under a budget, else finished trials."""
    return compute_used(study, budget.max_epochs) if budget is not None else float(finished_trials(study))


def compute_line(tuner: Tuner, study: optuna.Study) -> str:
    """What the study's training compute came to: ``compute: used 9.6 of 10 trainings (...)``."""
    max_epochs = tuner.max_epochs
    if max_epochs is None:
        return "compute: unknown (the config sets no trainer.max_epochs)"
    used = compute_used(study, max_epochs)
    trials, reruns = used - rerun_runs(study), rerun_runs(study)
    parts = f"trials {trials:.1f}, re-runs {reruns}; one training = {max_epochs} epochs"
    budget = tuner.budget
    head = budget.describe(used) if budget is not None else f"used {used:.1f} trainings"
    return f"compute: {head} ({parts})"


def _run_trials(workers: Workers, study: optuna.Study, console: Console) -> None:
    """The workers' trials, under a progress bar of the study's finished trials (polled from the storage)."""
    cfg = workers.tuner.study_config
    stop = threading.Event()
    with Progress(
        TextColumn("[bold]trials"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TimeElapsedColumn(),
        TimeLeftColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    ) as progress:
        # the bar counts trainings of the trials' share of the budget, or finished trials of n_trials
        budget = workers.tuner.budget
        total = float(budget.budget - budget.reserve if budget is not None else cfg.n_trials or 0)
        # a resumed study's earlier trials count on the bar, not in this run's pace (the ETA)
        start = min(_done(study, budget), total)
        task = progress.add_task("trials", total=total, start_count=start, info="", count="")
        progress.update(task, completed=start)
        lines = FinishedTrials(study, cfg)  # one line per trial finished from now on, whichever worker ran it

        def refresh() -> None:
            lines.print_new(progress.console)
            done, pruned, failed, best = _status(study)
            info = f"best {cfg.metric} {best}  pruned {pruned}  failed {failed}"
            now = min(_done(study, budget), total)
            if budget is not None:
                count = f"{now:.1f}/{total:g} trainings"
                progress.update(task, completed=now, count=count, info=f"{done} trials  {info}")
            else:
                progress.update(task, completed=now, count=f"{done}/{total:g}", info=info)

        def poll() -> None:
            while not stop.wait(1.0):
                refresh()

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        quiet = _FailureWarnings()  # this process's "trial N failed" warnings: its trial lines say it
        logging.getLogger(Tuner.__module__).addFilter(quiet)
        try:
            workers.run_trials(study)
        except KeyboardInterrupt as err:  # the CLI prints one line with the count
            raise Interrupted(finished_trials(study)) from err
        finally:
            stop.set()
            poller.join()
            refresh()
            logging.getLogger(Tuner.__module__).removeFilter(quiet)


class _FailureWarnings(logging.Filter):
    """Drops the runner's ``trial N failed: ...`` warnings while :class:`FinishedTrials` prints a line for each
    finished trial (the same news twice otherwise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("trial %d failed")


class TimeLeftColumn(ProgressColumn):
    """The time left at this run's average pace so far (elapsed over the steps done since the start, times the
    steps left; the task's ``start_count`` field is where it started). Rich's own ``TimeRemainingColumn``
    measures the pace over the last 30 s only, which for trials of minutes is mostly no estimate at all."""

    def render(self, task: Task) -> Text:
        done = task.completed - float(task.fields.get("start_count", 0))
        if task.finished or task.remaining is None:
            return Text("")
        if done <= 0 or not task.elapsed:
            return Text("eta -:--:--", style="progress.remaining")
        left = datetime.timedelta(seconds=round(task.elapsed / done * task.remaining))
        return Text(f"eta {left}", style="progress.remaining")


class FinishedTrials:
    """Prints one line per trial that finishes (:func:`trial_line`), read from the storage, so every worker's
    trials are covered; the trials finished before it was made are not repeated."""

    def __init__(self, study: optuna.Study, cfg: StudyConfig) -> None:
        self.study, self.cfg = study, cfg
        self.seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}

    def print_new(self, console: Console) -> None:
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state.is_finished() and trial.number not in self.seen:
                self.seen.add(trial.number)
                line = trial_line(trial, self.cfg.metric, self.cfg.value)
                if line is not None:
                    console.print(line, markup=False, highlight=False, soft_wrap=True)


def trial_line(trial: FrozenTrial, metric: str, value: str = "best") -> str | None:
    """The line that reports a finished trial: its number and label, its outcome (the trial value, labelled
    with the rule that made it from the curve, ``pruned at epoch N`` or ``failed: reason``), its plan and its
    ``search:`` values. ``None`` for a trial that does not count (interrupted, or a duplicate never run)."""
    reason = trial.user_attrs.get(FAIL_ATTR)
    if reason in (INTERRUPTED, DUPLICATE):
        return None
    fixed = fixed_label(trial)
    head = f"trial {trial.number}" + (f" ({fixed})" if fixed else "")
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        rule = "best epoch" if value == "best" else f"{value} of the curve"
        outcome = f"{metric} {trial.value:.4f} ({rule})"
    elif trial.state == TrialState.PRUNED:
        steps = trial.intermediate_values
        last = max(steps) if steps else None
        outcome = "pruned" if last is None else f"pruned at epoch {last} ({metric} {steps[last]:.4f})"
    else:
        why = redact(str(reason or "")).strip().split("\n", 1)[0] or "no reason recorded"
        outcome = f"failed: {why[:200]}"
    parts = [head, outcome]
    if trial.user_attrs.get(PLAN_ATTR):
        parts.append(plan_summary(stored_plan(trial)))
    searched = {k.rsplit(".", 1)[-1]: v for k, v in (trial.user_attrs.get(SEARCH_ATTR) or {}).items()}
    if searched:
        parts.append(
            ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in searched.items())
        )
    return "  ".join(parts)


def rerun_status(study: optuna.Study, cfg: StudyConfig, last: str, budget: BudgetPlan | None = None) -> str:
    """The re-run status line: ``re-run K of N done, race round R (last: <what>)``: K counted over every
    worker's re-runs stored in the study, N the runs of the rounds known so far (the race adds a round when
    the last one is complete and still leaves a candidate undecided)."""
    jobs, race = rerun_jobs(study, cfg, budget)
    attrs = study.user_attrs
    gathered = attrs.get(RERUNS_ATTR) or {}
    done = sum(
        job.key in attrs or job.index < len(gathered.get(str(job.trial.number), {}).get("values", []))
        for job in jobs
    )
    dropped = f", {len(race.dropped)} dropped" if race.dropped else ""
    return f"re-run {done} of {len(jobs)} done, race round {len(race.rounds)}{dropped} (last: {last})"


def study_command(verb: str, cfg: StudyConfig, args: Sequence[str]) -> str:
    """A ``lightning-dropout VERB ...`` command (``report``, ``best``) for this study that can be pasted as
    printed: the tuning config when the file alone locates the study (its ``study.name``, ``study.run_dir``
    and ``study.storage`` are the ones in effect: nothing on the command line changed them), else the study
    name with its storage URL. A URL with a password is never printed (its password would show as ``***``):
    then the command relies on ``$LIGHTNING_DROPOUT_STORAGE``, and says so."""
    config = _config_path(args)
    if config is not None and _locates(config, cfg):
        return f"lightning-dropout {verb} {shlex.quote(config)}"
    command = f"lightning-dropout {verb} {shlex.quote(cfg.name)}"
    url = cfg.storage_url()
    if url == resolve_storage(None, cfg.name):  # what the name alone finds: the environment's or the default
        return command
    if redact(url) == url:
        return f"{command} --storage {shlex.quote(url)}"
    return f"{command}  (with {STORAGE_ENV} set to the storage URL, which holds a password)"


def _config_path(args: Sequence[str]) -> str | None:
    """The one config file of the arguments (``--config FILE`` or ``--config=FILE``), if exactly one."""
    found = [b for a, b in itertools.pairwise(args) if a in ("--config", "-c")]
    found += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    return found[0] if len(found) == 1 else None


def _locates(config: str, cfg: StudyConfig) -> bool:
    """Whether ``config``'s own ``study:`` section (defaults filled in) names this study, run dir and storage."""
    try:
        study = (yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}).get("study") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    if not isinstance(study, dict):
        return False
    defaults = {f.name: f.default for f in fields(StudyConfig) if f.name in ("name", "run_dir", "storage")}
    return all(study.get(key, default) == getattr(cfg, key) for key, default in defaults.items())


def results_table(ranked: list[Candidate], metric: str, maximize: bool = True, rule: str = "one_se") -> Table:
    """The re-run candidates, best mean first, with each one's paired gain ± the half-width of its 95 % interval
    (``*``: more than the noise) over no dropout and over the best uniform rate; the winner is marked."""
    table = Table(
        title=f"{metric} over seeds, best first (gain: paired difference ± 95 % interval, * beyond the noise; "
        "dropped: the race found it worse than the leader)"
    )
    header, rows = comparison_rows(compare(ranked, maximize, rule), "", sites_sep="\n")  # a line per site run
    for column in header:
        table.add_column(column.strip())
    for row in rows:
        table.add_row(*row)
    return table


def verdict(ranked: list[Candidate], maximize: bool, rule: str, metric: str) -> list[str]:
    """The winner's gains in plain words: whether each is more than the noise of the re-run seeds."""
    chosen = choose_winner(ranked, maximize, rule)
    how = (
        "the least dropout within one standard error of the best mean"
        if rule == "one_se"
        else "the best mean over the seeds"
    )
    lines = [f"chosen by {rule}: {how}."]
    for reference in references(ranked):
        if reference is None or reference is chosen:
            continue
        gain = paired_gain(chosen, reference, maximize)
        if gain.n < 2:
            lines.append(
                f"{chosen.label} vs {reference.label}: {gain.mean:+.4f} {metric} (one seed: no noise estimate)."
            )
            continue
        span = f"{gain.mean:+.4f} {metric}, 95 % interval [{gain.low:+.4f}, {gain.high:+.4f}] over {gain.n} paired seeds"
        if gain.significant and gain.mean > 0:
            words = "better, by more than the noise"
        elif gain.significant:
            words = "worse, by more than the noise"
        else:
            words = "within the noise: these seeds cannot tell them apart"
        lines.append(f"{chosen.label} vs {reference.label}: {span}: {words}.")
    return lines
