"""``tune`` end to end, with a Rich progress bar and the final table (used by the CLI; no argv here)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightning_dropout.errors import Interrupted
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.tune.config import redact
from lightning_dropout.tune.loggers import publish_study, uses_tensorboard
from lightning_dropout.tune.records import DUPLICATE, FAIL_ATTR, finished_trials, winner
from lightning_dropout.tune.report import plan_summary, write_study_images
from lightning_dropout.tune.runner import Tuner
from lightning_dropout.tune.selection import (
    Candidate,
    Comparison,
    choose_winner,
    compare,
    paired_gain,
    references,
)
from lightning_dropout.tune.workers import Workers

__all__ = ["plan_summary", "results_table", "tune", "verdict"]

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
    console = console or Console(stderr=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # progress bar, table, one line per failed trial
    tuner = Tuner(args)
    cfg = tuner.study_config
    study = tuner.study()
    tuner.enqueue_fixed(study)
    console.print(
        f"study [bold]{cfg.name}[/] in {redact(cfg.storage_url())}: {cfg.metric} ({cfg.direction}), "
        f"{cfg.n_trials} trials, {cfg.workers} worker(s)"
    )
    images = Path(cfg.run_dir) / cfg.name / "study"
    with Workers(tuner) as workers:
        _run_trials(workers, study, console)
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            write_study_images(study, images)  # e.g. the intermediate values of pruned trials
            done, pruned, failed, _ = _status(study)
            console.print(
                f"no trial completed ({pruned} pruned, {failed} failed of {done}): no best plan to write."
            )
            return None, [], None
        ranked: list[Candidate] = []
        if cfg.seeds > 1:
            with console.status("re-running the best plans over seeds") as status:
                ranked = workers.rerun(study, on_done=lambda msg: status.update(f"re-running: {msg}"))
    plan, label = winner(study)
    path = plan.save(Path(cfg.run_dir) / cfg.name / "best_plan.yaml")
    write_study_images(study, images)
    publish_study(tuner.logger_specs, study, path)  # MLflow: the study's parent run
    results = Console()  # the result goes to stdout; progress and status to stderr
    maximize = cfg.direction == "maximize"
    if ranked:
        results.print(results_table(ranked, cfg.metric, maximize, cfg.winner))
        for line in verdict(ranked, maximize, cfg.winner, cfg.metric):
            results.print(line)
    else:
        results.print(f"best trial: {label}")
    results.print(f"winner: {label}; plan written to {path}")
    report = f"lightning-dropout report {cfg.name}" + (
        f" --storage {redact(cfg.storage)}" if cfg.storage else ""
    )
    if uses_tensorboard(tuner.logger_specs):
        results.print(
            f"TensorBoard: tensorboard --logdir {Path(cfg.run_dir) / cfg.name} (study figures under IMAGES, run "
            f"`study`); HTML report: {report}"
        )
    else:
        results.print(f"runs logged to the config's trainer.logger; HTML report: {report}")
    return plan, ranked, path


def _run_trials(workers: Workers, study: optuna.Study, console: Console) -> None:
    """The workers' trials, under a progress bar of the study's finished trials (polled from the storage)."""
    cfg = workers.tuner.study_config
    stop = threading.Event()
    with Progress(
        TextColumn("[bold]trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("trials", total=cfg.n_trials, info="")

        def refresh() -> None:
            done, pruned, failed, best = _status(study)
            progress.update(
                task,
                completed=min(done, cfg.n_trials),
                info=f"best {cfg.metric} {best}  pruned {pruned}  failed {failed}",
            )

        def poll() -> None:
            while not stop.wait(1.0):
                refresh()

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            workers.run_trials(study)
        except KeyboardInterrupt as err:  # the CLI prints one line with the count
            raise Interrupted(finished_trials(study)) from err
        finally:
            stop.set()
            poller.join()
            refresh()


def results_table(ranked: list[Candidate], metric: str, maximize: bool = True, rule: str = "one_se") -> Table:
    """The re-run candidates, best mean first, with each one's paired gain ± the half-width of its 95 % interval
    (``*``: more than the noise) over no dropout and over the best uniform rate; the winner is marked."""
    table = Table(
        title=f"{metric} over seeds, best first (gain: paired difference ± 95 % interval, * beyond the noise)"
    )
    for column in (
        "plan",
        "trial",
        "mean",
        "std",
        "seeds",
        "gain vs no dropout",
        "gain vs best uniform",
        "sites",
    ):
        table.add_column(column)
    for row in compare(ranked, maximize, rule):
        c = row.candidate
        table.add_row(
            f"{c.label} (winner)" if row.winner else c.label,
            str(c.trial),
            "nan" if math.isnan(c.mean) else f"{c.mean:.4f}",
            f"{c.std:.4f}",
            str(len(c.values)),
            Comparison.format(row.vs_none),
            Comparison.format(row.vs_uniform),
            plan_summary(c.plan),
        )
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
