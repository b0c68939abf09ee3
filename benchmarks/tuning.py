"""Tuning throughput on MNIST-1D: what pruning saves, what a second worker adds, what a trial costs outside fit.

Three measurements of ``lightning-dropout tune`` (``lightning_dropout/tune/``) with the paper's MLP on MNIST-1D
and the dropout search space of ``configs/mnist1d_mlp.yaml`` (``standard|gaussian|concrete``, ``p`` in
``[0, 0.5]`` after each hidden Linear), written to a temporary YAML with its own data cache, run directory and a
unique study name per run (``study.seeds=0``: no re-runs over seeds after the study):

1. ``pruning``: the same study (same sampler seed, same trials budget) without a pruner and with each of
   several pruners (``--pruner JSON``, repeatable; default ``MedianPruner``, ``PercentilePruner`` keeping the
   top quarter, ``SuccessiveHalvingPruner``), in this process through ``lightning_dropout.tune.study.tune`` (the CLI's code path,
   progress poller included). Reports the wall time and the epochs trained by each, the speed-up, and the best
   ``val_acc`` of each side by side. Targets: >= 3x faster, best within 1.5 pp (single trials on MNIST-1D
   differ by about that much from seed noise alone).
2. ``workers``: trials per minute of a study with ``study.workers=1`` and ``=2`` (no pruner, SQLite storage),
   each run as ``python -m lightning_dropout.cli tune`` with ``OMP_NUM_THREADS=1`` so two workers do not
   fight over the cores. Throughput is counted over the trials' span in the storage (first trial start to
   last trial end) and end to end (process wall time, which includes imports and spawning workers). Target:
   >= 1.8x on 2 cores.
3. ``overhead``: in-process trials of a tiny run (``max_epochs=1``, one train and one val batch) through
   ``Tuner.run_worker``: per trial, the cycle from one trial's start to the next against the time between
   Lightning's ``on_fit_start`` and ``on_fit_end``, and the same for plain ``trainer.fit`` runs built from the
   same config. Target: <= 0.5 s per trial outside training.

Usage::

    python benchmarks/tuning.py                  # full run (about 11 min on 2 idle cores) -> benchmarks/results/tuning.md
    python benchmarks/tuning.py --quick --out /tmp/tuning.md   # smoke test, tiny trials, < 60 s
    python benchmarks/tuning.py --only overhead
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import gc
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from common import quiet

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tuning.md"
SECTIONS = ("pruning", "workers", "overhead")
REPO = Path(__file__).resolve().parent.parent

TARGET_PRUNING_SPEEDUP = 3.0
TARGET_BEST_PP = 1.5
TARGET_WORKERS = 1.8
TARGET_OVERHEAD_S = 0.5

THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Sizes:
    prune_trials: int
    prune_epochs: int
    n_startup_trials: int
    n_warmup_steps: int
    worker_trials: int
    worker_epochs: int
    overhead_trials: int
    limit_batches: int | None  # train and val batches per epoch; None: all (36 train, 4 val batches of 100)
    workers_subprocess: (
        bool  # False: the workers studies run through tune() in this process (saves 2 imports)
    )


FULL = Sizes(
    prune_trials=40,
    prune_epochs=20,
    n_startup_trials=5,
    n_warmup_steps=3,
    worker_trials=8,
    worker_epochs=20,
    overhead_trials=20,
    limit_batches=None,
    workers_subprocess=True,
)
QUICK = Sizes(
    prune_trials=4,
    prune_epochs=2,
    n_startup_trials=1,
    n_warmup_steps=0,
    worker_trials=2,
    worker_epochs=1,
    overhead_trials=3,
    limit_batches=2,
    workers_subprocess=False,
)


# ----------------------------------------------------------------------------------------------------------
# Config, machine, storage
# ----------------------------------------------------------------------------------------------------------
def write_config(path: Path, sizes: Sizes, max_epochs: int, tiny: bool = False) -> Path:
    """A tuning config for the MNIST-1D MLP (the search space of configs/mnist1d_mlp.yaml)."""
    trainer: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "enable_checkpointing": False,
        "log_every_n_steps": 10,
    }
    if tiny:
        trainer.update(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    elif sizes.limit_batches is not None:
        trainer.update(limit_train_batches=sizes.limit_batches, limit_val_batches=sizes.limit_batches)
    config = {
        "seed_everything": 42,
        "model": {"class_path": "lightning_dropout.zoo.MLP"},
        "data": {
            "class_path": "lightning_dropout.data.MNIST1DDataModule",
            "init_args": {"batch_size": 100, "val_fraction": 0.1},
        },
        "trainer": trainer,
        "dropout": {
            "groups": [
                {
                    "name": "hidden",
                    "select": {"match": "Linear"},
                    "variants": ["standard", "gaussian", "concrete"],
                    "p": [0.0, 0.5],
                    "per_layer": True,
                }
            ]
        },
        "study": {
            "name": "bench",
            "metric": "val_acc",
            "direction": "maximize",
            "n_trials": sizes.prune_trials,
            "pruner": {
                "class_path": "optuna.pruners.MedianPruner",
                "init_args": {
                    "n_startup_trials": sizes.n_startup_trials,
                    "n_warmup_steps": sizes.n_warmup_steps,
                },
            },
            "top_k": 3,
            "seeds": 0,
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def common_overrides(tmp: Path, label: str) -> tuple[str, list[str]]:
    """A unique study name and the overrides every run gets (own data cache, run dir, no re-runs)."""
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    return name, [
        f"--data.init_args.cache_dir={tmp / 'data'}",
        "--study.seeds=0",
        f"--study.run_dir={tmp / 'runs'}",
        f"--study.name={name}",
    ]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux/macOS
        return (float("nan"),) * 3


@dataclass
class StudyStats:
    """What a finished study's storage says about it."""

    wall: float  # seconds: the tune() call or the process
    complete: int
    pruned: int
    failed: int
    best: float
    epochs: int  # validations reported, i.e. epochs trained, over all trials
    span: float  # first trial start to last trial end (storage timestamps)
    busy: float  # sum of trial durations
    durations: list[float] = field(default_factory=list)
    pruned_epochs: list[int] = field(default_factory=list)  # epochs each pruned trial trained
    fixed: int = 0  # trials enqueued before the sampler (baselines, warm-start grid): never pruned
    reruns: int = 0  # re-runs over seeds after the trials (`study.seeds`)
    cpu: float = float("nan")  # CPU seconds of the process tree (subprocess runs only)

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def concurrency(self) -> float:
        return self.busy / self.span if self.span > 0 else float("nan")


def study_stats(name: str, run_dir: Path, wall: float) -> StudyStats:
    import optuna
    from optuna.trial import TrialState

    from lightning_dropout.tune.records import fixed_label

    storage = f"sqlite:///{run_dir / name / 'study.db'}"
    study = optuna.load_study(study_name=name, storage=storage)
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    if not trials:
        raise RuntimeError(f"study {name} in {storage} has no finished trial")
    count = {
        s: sum(t.state == s for t in trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]  # type: ignore[operator]
    start = min(t.datetime_start for t in trials)  # type: ignore[type-var]
    end = max(t.datetime_complete for t in trials)  # type: ignore[type-var]
    try:
        best = float(study.best_value)
    except ValueError:
        best = float("nan")
    return StudyStats(
        wall=wall,
        complete=count[TrialState.COMPLETE],
        pruned=count[TrialState.PRUNED],
        failed=count[TrialState.FAIL],
        best=best,
        epochs=sum(len(t.intermediate_values) for t in trials),
        span=(end - start).total_seconds(),
        busy=sum(durations),
        durations=durations,
        pruned_epochs=[len(t.intermediate_values) for t in trials if t.state == TrialState.PRUNED],
        fixed=sum(fixed_label(t) is not None for t in trials),
        reruns=sum(len(info["values"]) for info in (study.user_attrs.get("reruns") or {}).values()),
    )


def progress(msg: str) -> None:
    sys.stderr.write(f"[tuning {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------------------
# 1. Pruning
# ----------------------------------------------------------------------------------------------------------
def tune_in_process(config: Path, tmp: Path, label: str, extra: list[str]) -> StudyStats:
    from rich.console import Console

    from lightning_dropout.tune.study import tune

    name, overrides = common_overrides(tmp, label)
    console = Console(file=io.StringIO(), width=120)
    with quiet():
        start = time.perf_counter()
        tune(["--config", str(config), *overrides, *extra], console=console)
        wall = time.perf_counter() - start
    return study_stats(name, tmp / "runs", wall)


def default_pruners(sizes: Sizes) -> list[dict[str, Any]]:
    """The pruners compared against no pruning: the config default's family, a percentile pruner keeping the
    top quarter at every epoch from the second, and successive halving keeping the better half at each rung
    (rungs from the 2nd or the 3rd epoch). At paper length (>= 100 epochs): the study's default as shipped
    (``MedianPruner(n_startup_trials=5)`` asked from ``prune_after=0.5`` of the epochs on), the same asked from
    0.2 and from 0.1, and successive halving with rungs at the 30th and 90th epoch and no ``prune_after``
    (from the 10th epoch it lost the best trial: 4 pp). A spec's ``prune_after`` key
    becomes ``--study.prune_after``."""
    startup, warmup = sizes.n_startup_trials, sizes.n_warmup_steps
    if sizes.prune_epochs >= 100:
        median = {"class_path": "optuna.pruners.MedianPruner", "init_args": {"n_startup_trials": startup}}
        halving = {
            "class_path": "optuna.pruners.SuccessiveHalvingPruner",
            "init_args": {"min_resource": 30, "reduction_factor": 3},
        }
        return [
            {**median, "prune_after": 0.5},
            {**median, "prune_after": 0.2},
            {**median, "prune_after": 0.1},
            {**halving, "prune_after": 0.0},
        ]
    return [
        {
            "class_path": "optuna.pruners.MedianPruner",
            "init_args": {"n_startup_trials": startup, "n_warmup_steps": warmup},
        },
        {
            "class_path": "optuna.pruners.PercentilePruner",
            "init_args": {"percentile": 25.0, "n_startup_trials": startup, "n_warmup_steps": 1},
        },
        {
            "class_path": "optuna.pruners.SuccessiveHalvingPruner",
            "init_args": {"min_resource": 1, "reduction_factor": 2},
        },
        {
            "class_path": "optuna.pruners.SuccessiveHalvingPruner",
            "init_args": {"min_resource": 2, "reduction_factor": 2},
        },
    ]


def pruner_label(spec: dict[str, Any]) -> str:
    args = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.get("init_args", {}).items()
    )
    after = f", prune_after={spec['prune_after']:g}" if "prune_after" in spec else ""
    return f"{spec['class_path'].rpartition('.')[2]}({args}){after}"


def bench_pruning(
    tmp: Path, sizes: Sizes, pruners: list[dict[str, Any]], warm_start: bool = False, jobs: int = 1
) -> dict[str, Any]:
    """The study without a pruner, then one per pruner; ``jobs`` > 1 runs that many studies at a time in
    spawned processes (the epochs ratios are unchanged; the wall times then share the cores)."""
    config = write_config(tmp / "pruning.yaml", sizes, sizes.prune_epochs)
    # every study of the comparison: the best epoch's value (what the table compares); by default no
    # warm-start grid (its fixed trials are never pruned, which caps what any pruner saves: see the ceiling)
    extra = [f"--study.n_trials={sizes.prune_trials}", "--study.value=best"]
    if not warm_start:
        extra.append("--study.warm_start=false")
    studies = [("nopruner", [*extra, "--study.pruner=null"])]
    for spec in pruners:
        pruner = {k: v for k, v in spec.items() if k != "prune_after"}
        after = [f"--study.prune_after={spec['prune_after']}"] if "prune_after" in spec else []
        studies.append(("pruned", [*extra, *after, f"--study.pruner={json.dumps(pruner)}"]))
    progress(
        f"pruning: {sizes.prune_trials} trials x {sizes.prune_epochs} epochs, without pruner and with "
        f"{len(pruners)} pruners, {jobs} at a time"
    )
    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            # each job's process: torch threads from OMP_NUM_THREADS=1 (set before the pool spawns it)
            futures = [pool.submit(tune_in_process, config, tmp, label, args) for label, args in studies]
            stats = [future.result() for future in futures]
    else:
        stats = [tune_in_process(config, tmp, label, args) for label, args in studies]
    full, runs = stats[0], list(zip(pruners, stats[1:], strict=True))
    progress(f"  none: {full.wall:.1f} s, best {full.best:.4f}")
    for spec, run in runs:
        progress(f"  {pruner_label(spec)}: {run.wall:.1f} s, {run.pruned} pruned, best {run.best:.4f}")
    return {"full": full, "pruned": runs, "warm_start": warm_start, "jobs": jobs}


def epochs_ceiling(spec: dict[str, Any], n_trials: int, epochs: int, fixed: int) -> float:
    """The most a pruner could save, as an epochs ratio: every trial it may stop stopped at its first chance.

    Never stopped: the ``fixed`` trials (baselines, warm-start grid) and the trials a pruner needs before it
    prunes at all: ``n_startup_trials`` finished ones for the median/percentile rules (finished fixed trials
    count), the first one for successive halving (the first trial at a rung is always promoted). The first
    chance is the later of ``prune_after`` x ``epochs`` and the pruner's own warm-up (``n_warmup_steps`` or
    ``min_resource``)."""
    args = spec.get("init_args", {})
    name = spec["class_path"].rpartition(".")[2]
    if name == "SuccessiveHalvingPruner":
        startup, warmup = 1, int(args.get("min_resource", 1) if args.get("min_resource") != "auto" else 1)
    else:
        startup = max(0, int(args.get("n_startup_trials", 5)) - fixed)
        warmup = int(args.get("n_warmup_steps", 0))
    first = max(1, math.ceil(float(spec.get("prune_after", 0.0)) * epochs), warmup)
    kept = min(n_trials, fixed + startup)
    return n_trials * epochs / (kept * epochs + (n_trials - kept) * min(first, epochs))


def pruning_markdown(res: dict[str, Any], sizes: Sizes) -> list[str]:
    f: StudyStats = res["full"]
    lines = [
        "## 1. Pruning",
        "",
        f"{sizes.prune_trials} trials x max {sizes.prune_epochs} epochs, same sampler seed; each pruner vs "
        "`study.pruner=null` (run once, first); in-process `tune()`. Best = best `val_acc` (max over epochs) of "
        "one trial. Speed-up = wall time without pruner / with; the epochs ratio is the same measure free of "
        "machine load"
        + (
            f" (the studies ran {res['jobs']} at a time, so their wall times share the cores)"
            if res.get("jobs", 1) > 1
            else ""
        )
        + ". Ceiling = the epochs ratio if every trial the pruner may stop were stopped at its first "
        "chance (fixed trials and the pruner's startup trials run in full): no pruner of that setting can do better."
        + (
            f" Every study runs the product's default warm start ({f.fixed} fixed trials: the baselines and the "
            "uniform grid, never pruned), as a user's study does."
            if res.get("warm_start")
            else " No warm start (`study.warm_start=false`): every trial is the sampler's."
        ),
        "",
        "| pruner | wall s | complete / pruned / failed | epochs trained | pruned trials stopped after (median, range) | best val_acc | speed-up (wall) | epochs ratio | ceiling | best - unpruned |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| none | {f.wall:.1f} | {f.complete} / {f.pruned} / {f.failed} | {f.epochs} | - | {f.best:.4f} | 1.00x | 1.00x | 1.00x | - |",
    ]
    verdicts = []
    for spec, p in res["pruned"]:
        speedup = f.wall / p.wall
        ratio = f.epochs / p.epochs if p.epochs else float("nan")
        diff_pp = 100 * (p.best - f.best)
        stops = sorted(p.pruned_epochs)
        stopped = f"{statistics.median(stops):g} ({stops[0]}-{stops[-1]})" if stops else "-"
        ceiling = epochs_ceiling(spec, sizes.prune_trials, sizes.prune_epochs, p.fixed)
        lines.append(
            f"| `{pruner_label(spec)}` | {p.wall:.1f} | {p.complete} / {p.pruned} / {p.failed} | {p.epochs} | "
            f"{stopped} | {p.best:.4f} | **{speedup:.2f}x** | {ratio:.2f}x | {ceiling:.2f}x | {diff_pp:+.2f} pp |"
        )
        # judged on the epochs ratio: free of the machine's load (wall times of runs minutes apart are not
        # comparable on a shared machine), and on an idle one within a few % of the wall ratio (per-trial
        # overhead is 0.13 s against ~0.5 s per epoch)
        met = ratio >= TARGET_PRUNING_SPEEDUP and diff_pp >= -TARGET_BEST_PP
        verdicts.append((met, ratio, pruner_label(spec), diff_pp))
    lines.append("")
    winners = [v for v in verdicts if v[0]]
    if winners:
        _, speedup, label, diff_pp = max(winners, key=lambda v: v[1])
        lines.append(
            f"- target (>= {TARGET_PRUNING_SPEEDUP:.0f}x fewer epochs trained, best within {TARGET_BEST_PP} pp): **met** by "
            f"`{label}`: {speedup:.2f}x at {diff_pp:+.2f} pp"
        )
    else:
        lines.append(
            f"- target (>= {TARGET_PRUNING_SPEEDUP:.0f}x fewer epochs trained, best within {TARGET_BEST_PP} pp): **not met** "
            "by any pruner above"
        )
    return lines


# ----------------------------------------------------------------------------------------------------------
# 2. Workers
# ----------------------------------------------------------------------------------------------------------
def tune_subprocess(config: Path, tmp: Path, label: str, extra: list[str]) -> StudyStats:
    name, overrides = common_overrides(tmp, label)
    cmd = [sys.executable, "-m", "lightning_dropout.cli", "tune", str(config), *overrides, *extra]
    env = {**os.environ, **THREAD_ENV, "PYTHONWARNINGS": "ignore"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers it joined included
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {proc.returncode}:\n{(proc.stderr or proc.stdout)[-3000:]}"
        )
    stats = study_stats(name, tmp / "runs", wall)
    stats.cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return stats


def bench_workers(tmp: Path, sizes: Sizes, seeds: int = 0) -> dict[str, Any]:
    config = write_config(tmp / "workers.yaml", sizes, sizes.worker_epochs)
    extra = [f"--study.n_trials={sizes.worker_trials}", "--study.pruner=null", f"--study.seeds={seeds}"]
    run = tune_subprocess if sizes.workers_subprocess else tune_in_process
    out: dict[str, Any] = {"subprocess": sizes.workers_subprocess, "seeds": seeds}
    for workers in (1, 2):
        progress(
            f"workers: {sizes.worker_trials} trials x {sizes.worker_epochs} epochs, {seeds} re-run seeds, "
            f"workers={workers}"
        )
        stats = run(config, tmp, f"w{workers}", [*extra, f"--study.workers={workers}"])
        progress(f"  {stats.wall:.1f} s wall, trial span {stats.span:.1f} s")
        out[f"w{workers}"] = stats
    return out


def workers_markdown(res: dict[str, Any], sizes: Sizes) -> list[str]:
    rows = []
    rate = {}
    for workers in (1, 2):
        s: StudyStats = res[f"w{workers}"]
        span_rate = 60 * s.finished / s.span
        wall_rate = 60 * s.finished / s.wall
        rate[workers] = (span_rate, wall_rate)
        rows.append(
            f"| {workers} | {s.finished} | {s.reruns} | {s.wall:.1f} | {s.span:.1f} | {span_rate:.2f} | "
            f"{wall_rate:.2f} | {statistics.median(s.durations):.1f} | {s.concurrency:.2f} | {s.cpu / s.wall:.2f} |"
        )
    one, two = res["w1"], res["w2"]
    ratio_span = rate[2][0] / rate[1][0]
    # end to end: the same work (trials, and the re-runs when there are any) in the whole process's time
    ratio_wall = rate[2][1] / rate[1][1] if not res["seeds"] else one.wall / two.wall
    how = (
        "each study a `python -m lightning_dropout.cli tune` process with `OMP_NUM_THREADS=1`. Span = first "
        "trial start to last trial end in the storage; wall = the whole process (imports, spawning the "
        "workers, opening the storage, the re-runs)."
        if res["subprocess"]
        else "each study through `tune()` in this process (--quick: saves two imports; workers=2 still spawns "
        "its two worker processes), `OMP_NUM_THREADS=1`. Span = first trial start to last trial end in the "
        "storage; wall = the `tune()` call."
    )
    reruns = (
        f"then `study.seeds={res['seeds']}` re-runs of each candidate (`top_k=3`, the best grid point and "
        "no dropout), shared by the workers; "
        if res["seeds"]
        else "no re-runs (`study.seeds=0`); "
    )
    end_to_end = (
        "study wall time 1 / 2 workers" if res["seeds"] else "trials per minute of wall time, 2 / 1 workers"
    )
    return [
        "## 2. Workers",
        "",
        f"{sizes.worker_trials} trials x {sizes.worker_epochs} epochs, no pruner, {reruns}SQLite storage (fine for 2 "
        f"local workers), {how} Trials = finished trials (two workers may overshoot `n_trials` by one: each checks "
        "the count after its own trial). Concurrency = sum of trial durations / span; cores used = CPU seconds of "
        "the process and its workers / wall (nan in-process): when it stays well below the workers' count while "
        "trials slow down, other jobs held the cores.",
        "",
        "| workers | trials | re-runs | wall s | span s | trials/min (span) | trials/min (wall) | median trial s "
        "| concurrency | cores used |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"- 2 / 1 workers end to end ({end_to_end}): **{ratio_wall:.2f}x** (target >= {TARGET_WORKERS}x on an idle "
        f"machine: {'met' if ratio_wall >= TARGET_WORKERS else 'not met'}); over the trial span alone "
        f"{ratio_span:.2f}x",
    ]


# ----------------------------------------------------------------------------------------------------------
# 3. Per-trial overhead outside training
# ----------------------------------------------------------------------------------------------------------
def _fit_timer() -> Any:
    from lightning.pytorch.callbacks import Callback

    class FitTimer(Callback):
        """Records the time between on_fit_start and on_fit_end of every fit it sees."""

        def __init__(self) -> None:
            self.durations: list[float] = []
            self._start = 0.0

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self._start = time.perf_counter()

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self.durations.append(time.perf_counter() - self._start)

    return FitTimer()


def _timed(fn: Callable[..., Any], sink: list[tuple[float, float]]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append((start, time.perf_counter()))

    return wrapper


def bench_overhead(tmp: Path, sizes: Sizes) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_dropout.config import load_config
    from lightning_dropout.tune.config import CONFIG_SECTIONS
    from lightning_dropout.tune.runner import Tuner

    n = sizes.overhead_trials
    config = write_config(tmp / "overhead.yaml", sizes, 1, tiny=True)
    progress(f"overhead: {n} plain fits and a {n}-trial study of 1 train + 1 val batch each")
    out: dict[str, Any] = {"n": n}
    with quiet():
        # plain Lightning: build model, datamodule, trainer from the same config, fit; n times
        _, overrides = common_overrides(tmp, "plain")
        cli = load_config(["--config", str(config), *overrides], instantiate=False, sections=CONFIG_SECTIONS)
        timer = _fit_timer()
        fits: list[tuple[float, float]] = []
        cycles: list[tuple[float, float]] = []
        for i in range(n + 2):  # the first two warm up (lazy imports, first fit)
            start = time.perf_counter()
            pl.seed_everything(0, workers=True, verbose=False)
            logger = TensorBoardLogger(
                tmp / "plain", name="plain", version=f"run_{i}", default_hp_metric=False
            )
            c = cli.fresh([timer], logger=logger, enable_progress_bar=False, enable_model_summary=False)
            _timed(c.trainer.fit, fits)(c.model, datamodule=c.datamodule)
            cycles.append((start, time.perf_counter()))
        out["plain"] = {
            "cycle": [b - a for a, b in cycles[2:]],
            "fit_call": [b - a for a, b in fits[2:]],
            "fit_inner": timer.durations[2:],
        }

        # the tuner: Tuner.run_worker, as `tune` runs it with one worker
        _, overrides = common_overrides(tmp, "overhead")
        tuner = Tuner(["--config", str(config), *overrides, f"--study.n_trials={n}", "--study.pruner=null"])
        timer = _fit_timer()
        fits = []
        objectives: list[tuple[float, float]] = []
        fresh = tuner.cli.fresh

        def fresh_timed(callbacks: Any = None, **kwargs: Any) -> Any:
            c = fresh([*(callbacks or []), timer], **kwargs)
            c.trainer.fit = _timed(c.trainer.fit, fits)  # type: ignore[method-assign]
            return c

        tuner.cli.fresh = fresh_timed  # type: ignore[method-assign]
        tuner.objective = _timed(tuner.objective, objectives)  # type: ignore[method-assign]
        start = time.perf_counter()
        study = tuner.study()
        opened = time.perf_counter()
        tuner.enqueue_fixed(study)
        fits.clear()
        timer.durations.clear()
        collects: list[tuple[float, float]] = []
        collect = gc.collect
        gc.collect = _timed(collect, collects)  # Optuna's gc_after_trial looks it up on each call
        try:
            begin = time.perf_counter()
            tuner.run_worker()
            end = time.perf_counter()
        finally:
            gc.collect = collect
    starts = [a for a, _ in objectives]
    out["study_open"] = opened - start
    out["run_worker"] = end - begin
    out["tuner"] = {
        # from one trial's objective start to the next: ask + objective + tell + gc, as the study loop runs it
        "cycle": [b - a for a, b in itertools.pairwise(starts)],
        "objective": [b - a for a, b in objectives[:-1]],
        "fit_call": [b - a for a, b in fits[:-1]],
        "fit_inner": timer.durations[:-1],
        "gc": [b - a for a, b in collects],
    }
    progress(f"  study open {out['study_open']:.2f} s, run_worker {out['run_worker']:.1f} s")
    return out


def overhead_markdown(res: dict[str, Any]) -> list[str]:
    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    p, t = res["plain"], res["tuner"]
    p_cycle, p_call, p_inner = med(p["cycle"]), med(p["fit_call"]), med(p["fit_inner"])
    t_cycle, t_obj, t_call, t_inner = (
        med(t["cycle"]),
        med(t["objective"]),
        med(t["fit_call"]),
        med(t["fit_inner"]),
    )
    outside = med([c - f for c, f in zip(t["cycle"], t["fit_inner"], strict=False)])
    gc_s = med(t["gc"])
    p_outside = med([c - f for c, f in zip(p["cycle"], p["fit_inner"], strict=False)])
    extra = outside - p_outside
    return [
        "## 3. Per-trial overhead outside training",
        "",
        f"{res['n']} trials of `max_epochs=1, limit_train_batches=1, limit_val_batches=1` (in-process "
        "`Tuner.run_worker`, no pruner, SQLite) against as many plain `trainer.fit` runs built from the same "
        "config (model + datamodule + trainer each time, a TensorBoard logger, seeded). Medians per trial, "
        "seconds. Cycle = one trial's start to the next (ask, objective, tell, gc); "
        "training = `on_fit_start` to `on_fit_end` (sanity check, 1 train + 1 val batch); "
        "`fit()` = the whole `trainer.fit` call (adds Lightning's setup and the plan sampled in the "
        "injector's `setup`).",
        "",
        "| run | cycle | objective | `fit()` call | training | outside training |",
        "|---|---:|---:|---:|---:|---:|",
        f"| plain `trainer.fit` | {p_cycle:.3f} | - | {p_call:.3f} | {p_inner:.3f} | {p_outside:.3f} |",
        f"| tuner trial | {t_cycle:.3f} | {t_obj:.3f} | {t_call:.3f} | {t_inner:.3f} | {outside:.3f} |",
        "",
        f"- per-trial time outside training: **{outside:.3f} s** (target <= {TARGET_OVERHEAD_S} s: "
        f"{'yes' if outside <= TARGET_OVERHEAD_S else 'no'}); of which {extra:+.3f} s more than a plain fit "
        f"loop pays, {t_cycle - t_obj:.3f} s in Optuna between objectives (tell, ask, gc), "
        f"{t_obj - t_call:.3f} s in the objective outside `fit()`",
        f"- `gc.collect()` between trials (Optuna's `gc_after_trial=True`): **{gc_s:.3f} s** per trial "
        f"(median of {len(t['gc'])}; a full collection scans the ~400k objects torch and Lightning leave)"
        if t["gc"]
        else "- `gc.collect()` between trials: none (`study.optimize` runs without `gc_after_trial`)",
        f"- once per study/worker, not per trial: opening the SQLite study {res['study_open']:.2f} s",
    ]


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def prepare_data(cache_dir: Path) -> None:
    """Generate MNIST-1D into the temporary cache once, outside any timing (copied from the user's cache when
    it holds the same file: the name is a digest of the generation arguments)."""
    import shutil

    from lightning_dropout.data import MNIST1DDataModule
    from lightning_dropout.data.mnist1d import default_cache_dir

    dm = MNIST1DDataModule(cache_dir=str(cache_dir))
    cached = default_cache_dir() / dm.cache_path.name
    if cached.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, dm.cache_path)
    dm.prepare_data()


def warm_up(tmp: Path, sizes: Sizes) -> None:
    """One tiny in-process study, untimed: the first trial in a process pays lazy imports and first calls."""
    progress("warm-up: one tiny trial in this process")
    config = write_config(tmp / "warmup.yaml", sizes, 1, tiny=True)
    tune_in_process(config, tmp, "warmup", ["--study.n_trials=1", "--study.pruner=null"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny trials, < 60 s")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="Markdown output (default benchmarks/results/tuning.md)"
    )
    parser.add_argument("--only", choices=SECTIONS, default=None, help="run one section")
    parser.add_argument(
        "--prune-epochs",
        type=int,
        default=None,
        help="epochs per pruning-study trial (default 20; the paper: 150)",
    )
    parser.add_argument(
        "--prune-trials", type=int, default=None, help="trials per pruning study (default 40)"
    )
    parser.add_argument(
        "--worker-epochs",
        type=int,
        default=None,
        help="epochs per trial of the workers studies (default 20; the quickstart's trials run 80)",
    )
    parser.add_argument(
        "--worker-seeds",
        type=int,
        default=0,
        help="re-run seeds (`study.seeds`) of the workers studies: the re-runs are shared by the workers too",
    )
    parser.add_argument(
        "--warm-start",
        action="store_true",
        help="pruning studies keep the default warm start (baselines and grid, never pruned), as users run them",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="pruning studies run at a time, each in its own process (default 1)",
    )
    parser.add_argument(
        "--pruner",
        action="append",
        default=[],
        help='a pruner to compare, as JSON {"class_path": ..., "init_args": {...}} (repeatable; default: three)',
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    os.environ.update(THREAD_ENV)  # before torch is imported: this process and any worker it spawns
    import lightning
    import optuna
    import torch

    import lightning_dropout

    torch.set_num_threads(1)
    sizes = QUICK if ns.quick else FULL
    if ns.prune_epochs or ns.prune_trials or ns.worker_epochs:
        sizes = dataclasses.replace(
            sizes,
            prune_epochs=ns.prune_epochs or sizes.prune_epochs,
            prune_trials=ns.prune_trials or sizes.prune_trials,
            worker_epochs=ns.worker_epochs or sizes.worker_epochs,
        )
    sections = [ns.only] if ns.only else list(SECTIONS)
    load_before = loadavg()
    started = time.perf_counter()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body: list[str] = []
    section_load: list[str] = []
    n_pruners = 0
    during: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ld-tuning-") as name:
        tmp = Path(name)
        prepare_data(tmp / "data")
        if {"pruning", "overhead"} & set(sections) or not sizes.workers_subprocess:
            warm_up(tmp, sizes)
        for section in sections:
            before = loadavg()[0]
            if section == "pruning":
                pruners = [json.loads(p) for p in ns.pruner] if ns.pruner else default_pruners(sizes)
                n_pruners = len(pruners)
                body += pruning_markdown(bench_pruning(tmp, sizes, pruners, ns.warm_start, ns.jobs), sizes)
            elif section == "workers":
                body += workers_markdown(bench_workers(tmp, sizes, ns.worker_seeds), sizes)
            else:
                body += overhead_markdown(bench_overhead(tmp, sizes))
            body.append("")
            during += [before, loadavg()[0]]
            section_load.append(f"{section} {before:.2f} -> {during[-1]:.2f}")
    total = time.perf_counter() - started
    load_after = loadavg()
    cores = os.cpu_count() or 1
    # this benchmark keeps one core busy (two during workers=2), which the load average counts too
    shared = load_before[0] > 0.5 * cores or max([load_after[0], *during]) > cores + 0.5
    header = [
        "# Tuning: pruning, workers, per-trial overhead (MNIST-1D MLP)",
        "",
        "Generated by `python benchmarks/tuning.py"
        + (" --quick" if ns.quick else "")
        + (f" --only {ns.only}" if ns.only else "")
        + (f" --prune-epochs {sizes.prune_epochs}" if ns.prune_epochs else "")
        + (f" --prune-trials {sizes.prune_trials}" if ns.prune_trials else "")
        + (f" --worker-epochs {sizes.worker_epochs}" if ns.worker_epochs else "")
        + (f" --worker-seeds {ns.worker_seeds}" if ns.worker_seeds else "")
        + (" --warm-start" if ns.warm_start else "")
        + (f" --jobs {ns.jobs}" if ns.jobs > 1 else "")
        + "` (see `benchmarks/README.md`).",
        "",
        f"- date: {when}",
        f"- CPU: {cpu_name()}, {cores} cores; torch threads: 1 per process (`OMP_NUM_THREADS=1`)",
        f"- torch {torch.__version__}, lightning {lightning.__version__}, optuna {optuna.__version__}, "
        f"lightning_dropout {lightning_dropout.__version__}, python {platform.python_version()}",
        "- sizes: "
        + (
            "--quick (tiny trials: smoke test only, the numbers mean nothing)"
            if ns.quick
            else "; ".join(
                {
                    "pruning": f"pruning: {sizes.prune_trials} trials x {sizes.prune_epochs} epochs per study, "
                    f"{n_pruners + 1} studies",
                    "workers": f"workers: {sizes.worker_trials} trials x {sizes.worker_epochs} epochs, 2 studies",
                    "overhead": f"overhead: {sizes.overhead_trials} tiny trials",
                }[section]
                for section in sections
            )
            + (
                "; the defaults are chosen so that pruning matters (a trial can be stopped after 4 of 20 epochs) "
                "and the whole run stays under ~25 min on 2 cores"
                if sizes == FULL
                else ""
            )
        )
        + f"; total run time {total / 60:.1f} min",
        f"- load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, after: "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}; per section (1 min): {'; '.join(section_load)}",
    ]
    if shared:
        header.append(
            f"- **note: the machine was shared** (1-min load average above {0.5 * cores:g} before the run or "
            f"above {cores + 0.5:g} during it, on {cores} cores): "
            "other jobs competed for the cores, so wall times are inflated and ratios noisier than on an "
            "idle machine; the epochs-trained ratio of section 1 is unaffected"
        )
    text = "\n".join([*header, "", *body]).rstrip() + "\n"
    sys.stdout.write(text)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(text)
    progress(f"wrote {ns.out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
