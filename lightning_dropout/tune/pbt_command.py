"""The ``tune`` command for ``study.method: pbt``: the population's segments in ``study.workers`` workers under a
progress bar, then the member table and the best member's rate schedule (the population itself:
:mod:`~lightning_dropout.tune.pbt`)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightning_dropout.errors import Interrupted
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.redaction import redact
from lightning_dropout.tune.loggers import uses_tensorboard
from lightning_dropout.tune.pbt import Population, PopulationResult, PopulationSpace, _segment_trials, _state
from lightning_dropout.tune.records import PBT_RESULT_ATTR
from lightning_dropout.tune.report import output_console, write_study_images
from lightning_dropout.tune.runner import Tuner
from lightning_dropout.tune.workers import Workers

__all__ = ["member_table", "tune_population"]


def tune_population(
    tuner: Tuner, study: optuna.Study, console: Console
) -> tuple[DropoutPlan | None, list[Any], Path | None]:
    """Run (or resume) the population of ``study`` in ``study.workers`` workers; write the best member's rate
    schedule as ``<run_dir>/<study>/best_plan.yaml``, store it on the study, print the member table. Returns the
    plan, ``[]`` (no re-runs) and its path, or ``None, [], None`` when no member finished."""
    cfg = tuner.study_config
    population = Population(tuner)
    population.bind(study)
    k, generations = population.size, population.generations
    epochs = population.segments[0][1]
    console.print(
        f"study [bold]{cfg.name}[/] in {redact(cfg.storage_url())}: {cfg.metric} ({cfg.direction}), "
        f"population-based training: {k} members x {generations} generations of {epochs} epoch(s) "
        f"({k} trainings), {cfg.workers} worker(s)"
    )
    with Workers(tuner) as workers:
        _run_segments(workers, study, population, console)
    result = population.result(study)
    run = Path(cfg.run_dir) / cfg.name
    write_study_images(study, run / "study")
    if result is None:
        console.print("no member finished: no best plan to write.")
        return None, [], None
    plan = result.plans[result.best]
    assert plan is not None
    path = plan.save(run / "best_plan.yaml")
    name = f"member {result.best}"
    study.set_user_attr(
        PBT_RESULT_ATTR,
        {
            "label": f"{name} (population-based training)",
            "plan": plan.to_yaml(),
            "member": result.best,
            "checkpoint": str(result.checkpoint),
        },
    )
    out = output_console()
    out.print(member_table(result, cfg.metric, population.space))
    out.print(
        f"winner: {name}, {cfg.metric} {result.values[result.best]:.4f}; its rate schedule written to {path} "
        f"(replay: lightning-dropout fit CONFIG --plan {path}); trained model: {result.checkpoint}"
    )
    if uses_tensorboard(tuner.logger_specs):
        out.print(f"TensorBoard: tensorboard --logdir {run} (runs trials/member_<m>)")
    return plan, [], path


def _run_segments(workers: Workers, study: optuna.Study, population: Population, console: Console) -> None:
    """The workers' segments, under a progress bar of the finished segments (polled from the storage)."""
    total = population.size * population.generations
    stop = threading.Event()
    with Progress(
        TextColumn("[bold]segments"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("segments", total=total)

        def refresh() -> None:
            trials = _segment_trials(study)
            done = sum(_state(group)[0] in ("done", "dead") for group in trials.values())
            progress.update(task, completed=min(done, total))

        def poll() -> None:
            while not stop.wait(1.0):
                refresh()

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            workers.run_trials(study)
        except KeyboardInterrupt as err:
            done = sum(_state(g)[0] == "done" for g in _segment_trials(study).values())
            raise Interrupted(done) from err
        finally:
            stop.set()
            poller.join()
            refresh()


def _schedule_text(plan: DropoutPlan, space: PopulationSpace, limit: int = 3) -> str:
    """Each dimension's rates over the epochs, ``hidden 0.21@0 0.25@4 0.19@8`` (the first ``limit``)."""
    parts = []
    for dim in list(space.ranges)[:limit]:
        key = next(k for k, d in space.site_dims.items() if d == dim)
        site = plan[key]
        steps = site.rates or ((0, site.p),)
        parts.append(f"{dim} " + " ".join(f"{r:.3g}@{e}" for e, r in steps))
    more = len(space.ranges) - limit
    return "; ".join(parts) + (f"; +{more} more" if more > 0 else "")


def member_table(result: PopulationResult, metric: str, space: PopulationSpace) -> Table:
    """The members: final value, the members their lineage copied, the rate schedule (the winner marked)."""
    table = Table(title=f"population members: final {metric}, lineage and rate schedule (rate@epoch)")
    for column in ("member", f"final {metric}", "copied", "rate schedule"):
        table.add_column(column)
    for m, value in enumerate(result.values):
        lineage = result.lineages[m]
        copies = [
            f"m{s.copied_from}@{s.start_epoch}" for s in lineage if s.copied_from not in (None, s.member)
        ]
        plan = result.plans[m]
        schedule = "-" if plan is None else _schedule_text(plan, space)
        table.add_row(
            f"{m} (winner)" if m == result.best else str(m),
            "failed" if value is None else f"{value:.4f}",
            ", ".join(copies) or "-",
            schedule,
        )
    return table
