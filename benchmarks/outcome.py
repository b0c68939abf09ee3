"""Tuning outcome on MNIST-1D, second edition: does the tuner beat no dropout, a uniform grid and a plain Optuna
objective at an equal training budget, and the paper's figures? (issue 9, part 5)

For each model of ``lightning_dropout.zoo`` (the MNIST-1D paper's MLP, CNN and GRU, and a small Transformer
encoder), on MNIST-1D (4000 training / 1000 test sequences, generated locally):

Selection happens on a 3600 / 400 split of the training sequences, each run at the model's training length
(the paper's 150 epochs of batch 100 for the MLP and CNN; shorter for the GRU and Transformer, see ``FULL``).

(a) ``none``: no dropout (nothing to select).
(c) ``tuner``: ``lightning-dropout tune`` with its defaults (``lightning_dropout.tune.study.tune``, the CLI's
    code path) on ``benchmarks/configs/outcome_<model>.yaml``: baseline, warm-start grid, sampled trials,
    pruning, paired re-runs of the candidates over 3 seeds and the one-SE winner rule.
(d) ``optuna``: what a user would write instead, in the style of Optuna's PyTorch Lightning example: one
    objective with ``trial.suggest_float("dropout", 0.0, 0.5)`` for one global rate of the obvious variant,
    optuna-integration's ``PyTorchLightningPruningCallback`` (``MedianPruner``), the last epoch's ``val_acc``
    returned; at least as many trials as (c), and trials until its epochs reach those of (c).
(b) ``grid``: the obvious variant at one rate p in {0.1, ..., 0.5}, each point run on as many seeds as make its
    epochs reach those of (c) (the seeds of (c)'s trials and re-runs); the best mean trial value wins.

Final runs: every arm's chosen configuration is retrained on all 4000 training sequences for the same number of
epochs (the paper's 6000 steps for the MLP and CNN) with 3 new seeds and tested once, at the last step: the
paper's protocol, and the only use of the test set.

Everything is resumable: each finished training run is saved at once in ``<work-dir>/<model>_stages.json`` and
the studies live in journal files beside it (text, so partial work can be committed). Running the script again
with the same ``--work-dir`` continues where it stopped.

Usage::

    python benchmarks/outcome.py --models mlp,transformer &  python benchmarks/outcome.py --models cnn,gru
    python benchmarks/outcome.py --report-only       # docs/benchmarks.md from the stages files
    python benchmarks/outcome.py --quick --work-dir /tmp/x --out-dir /tmp/x   # smoke test, numbers mean nothing
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common import cpu_model, quiet

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "benchmarks" / "configs"
WORK_DIR = REPO / "benchmarks" / "results" / "outcome"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "outcome.json"
DEFAULT_MD = REPO / "docs" / "benchmarks.md"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

MODELS = ("mlp", "cnn", "gru", "transformer")
# MNIST-1D README (greydanus/mnist1d), test accuracy; the Transformer is not in the paper
PAPER = {"mlp": 0.68, "cnn": 0.94, "gru": 0.91, "transformer": None}
GRID_RULES: dict[str, dict[str, Any]] = {
    "mlp": {"match": "Linear", "variant": "standard"},
    "cnn": {"match": "Conv1d", "variant": "spatial"},
    "gru": {"match": "GRU", "variant": "variational"},
    "transformer": {"replace": True, "variant": "standard"},
}
GRID_TEXT = {
    "mlp": "standard dropout after each hidden Linear",
    "cnn": "spatial (channel) dropout after each Conv1d",
    "gru": "variational dropout on the GRU output sequence",
    "transformer": "standard dropout in the encoder layers' own dropout slots (`Rule(replace=True)`)",
}
MODEL_TEXT = {"mlp": "MLP", "cnn": "CNN", "gru": "GRU", "transformer": "Transformer"}
ARMS = ("none", "grid", "tuner", "optuna")
ARM_TEXT = {
    "none": "(a) no dropout",
    "grid": "(b) uniform grid",
    "tuner": "(c) lightning-dropout tune",
    "optuna": "(d) plain Optuna",
}


@dataclass(frozen=True)
class Budget:
    models: tuple[str, ...]
    epochs: dict[str, int]
    trials: int
    grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    final_seeds: tuple[int, ...] = (1, 2, 3)
    selection_seed: int = 0
    limit_batches: int | None = None  # quick only
    extra: tuple[str, ...] = field(default=())  # more tune overrides (quick only)


FULL = Budget(
    models=MODELS,
    # the paper's 6000 steps of 100 (150 epochs of the 4000) for the MLP and CNN; the GRU (~1.5 s an epoch) and
    # the Transformer (~3 s) as long as about 4 hours on 2 cores allow
    epochs={"mlp": 150, "cnn": 150, "gru": 30, "transformer": 20},
    trials=20,
)
QUICK = Budget(
    models=("mlp",),
    epochs={"mlp": 2},
    trials=3,
    grid=(0.1, 0.5),
    final_seeds=(1,),
    limit_batches=3,
    extra=("--study.seeds=2", "--study.top_k=1", "--study.warm_start_rates=[0.1]", "--study.gap_samples=0"),
)


def progress(msg: str) -> None:
    sys.stderr.write(f"[outcome {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------
def curve_callback(*metrics: str) -> Any:
    """A callback keeping each of ``metrics`` (default ``val_acc``) after every validation: ``.curves[name]``."""
    from lightning.pytorch.callbacks import Callback

    class Curves(Callback):
        def __init__(self) -> None:
            self.curves: dict[str, list[float]] = {m: [] for m in metrics or ("val_acc",)}

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                for name, values in self.curves.items():
                    values.append(float(trainer.callback_metrics[name]))

    return Curves()


def trainer_kwargs(limit_batches: int | None = None) -> dict[str, Any]:
    """The Trainer overrides of every benchmark run: no logger, bar, summary or checkpoint."""
    kwargs: dict[str, Any] = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    if limit_batches is not None:
        n = limit_batches
        kwargs.update(limit_train_batches=n, limit_val_batches=n, limit_test_batches=n)
    return kwargs


def selection_run(tuner: Any, rule: dict[str, Any], p: float, seed: int, budget: Budget) -> dict[str, Any]:
    """One run of the obvious variant at rate ``p`` on the 3600/400 split: its validation curve and value."""
    import lightning.pytorch as pl

    from lightning_dropout import Rule
    from lightning_dropout.callback import DropoutInjector
    from lightning_dropout.tune.value import trial_value

    cfg = tuner.study_config
    start = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    curve = curve_callback()
    injector = DropoutInjector(rules=[Rule(**rule, p=p)], dropout_seed=cfg.dropout_seed)
    cli = tuner.cli.fresh([injector, curve], **trainer_kwargs(budget.limit_batches))
    with quiet():
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    values = curve.curves["val_acc"]
    value = trial_value(values, cfg.value, maximize=True, window=cfg.value_window)
    return {
        "p": p,
        "seed": seed,
        "value": value,
        "curve": values,
        "seconds": time.perf_counter() - start,
    }


def final_run(tuner: Any, plan: Any, seed: int, budget: Budget) -> dict[str, Any]:
    """Train ``plan`` on all 4000 training sequences with ``seed``; test accuracy at the last step."""
    import lightning.pytorch as pl

    from lightning_dropout.callback import DropoutInjector

    start = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    callbacks = [DropoutInjector(plan=plan, dropout_seed=seed)] if len(plan) else []
    cli = tuner.cli.fresh(callbacks, **trainer_kwargs(budget.limit_batches))
    with quiet():
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        (result,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return {
        "seed": seed,
        "test": float(result["test_acc"]),
        "epochs": int(cli.trainer.current_epoch),
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------
def prepare_data(cache_dir: Path) -> None:
    """Generate MNIST-1D into the run's own cache once (copied from the user's cache when that holds the same
    file: its name is a digest of the generation arguments)."""
    import shutil

    from lightning_dropout.data import MNIST1DDataModule
    from lightning_dropout.data.mnist1d import default_cache_dir

    dm = MNIST1DDataModule(cache_dir=str(cache_dir))
    cached = default_cache_dir() / dm.cache_path.name
    if cached.is_file() and not dm.cache_path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, dm.cache_path)
    dm.prepare_data()


def tuner_storage(name: str, work: Path) -> str:
    """Arm (c)'s study storage: a journal file in the work directory (text, so partial work can be committed)."""
    return f"journal:{work / f'{name}_tuner.journal'}"


def tune_args(name: str, budget: Budget, work: Path, tmp: Path, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The ``tune`` arguments of arm (c): the config, the model's length, the journal storage in ``work``."""
    args = [
        "--config",
        str(config_dir / f"outcome_{name}.yaml"),
        f"--trainer.max_epochs={budget.epochs[name]}",
        f"--data.init_args.cache_dir={tmp / 'data'}",
        f"--study.name=outcome_{name}",
        f"--study.run_dir={tmp / 'runs'}",
        f"--study.storage={tuner_storage(name, work)}",
        f"--study.n_trials={budget.trials}",
        f"--study.seed={budget.selection_seed}",
    ]
    if budget.limit_batches is not None:
        n = budget.limit_batches
        args += [f"--trainer.limit_train_batches={n}", f"--trainer.limit_val_batches={n}"]
    return args + list(budget.extra)


def make_tuner(name: str, budget: Budget, tmp: Path, config_dir: Path, extra: tuple[str, ...] = ()) -> Any:
    """A Tuner of the model's config (its CLI builds the model, data and trainer of every run)."""
    from lightning_dropout.tune import Tuner

    with quiet():
        return Tuner([*tune_args(name, budget, tmp, tmp, config_dir), *extra])


def _fail_stale(study: Any) -> None:
    """Trials left RUNNING by a killed earlier invocation (a journal storage has no heartbeat): failed, marked
    interrupted so that they do not count towards ``n_trials``."""
    from optuna.trial import TrialState

    from lightning_dropout.tune.records import FAIL_ATTR, INTERRUPTED

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, FAIL_ATTR, INTERRUPTED)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


class Stages:
    """What a model's run has done so far (``<work>/<model>_stages.json``), saved after every training run."""

    def __init__(self, path: Path, budget: Budget) -> None:
        self.path = path
        key = {
            "epochs": budget.epochs,
            "trials": budget.trials,
            "grid": list(budget.grid),
            "quick": budget.extra != (),
        }
        self.data: dict[str, Any] = {"key": key, "grid": {}, "final": {}, "elapsed": 0.0}
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("key") == json.loads(json.dumps(key)):
                self.data = old
                progress(f"resuming from {path}")
        self.base = float(self.data.get("elapsed", 0.0))
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.base + time.perf_counter() - self.started

    def save(self) -> None:
        self.data["elapsed"] = self.elapsed()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------
# The arms
# ----------------------------------------------------------------------------------------------------------
def arm_tuner(name: str, budget: Budget, work: Path, tmp: Path, stages: Stages) -> None:
    """(c): the real ``tune`` with its defaults; the epochs of its trials and re-runs are its budget."""
    import optuna
    from rich.console import Console

    from lightning_dropout.tune.records import open_study, winner
    from lightning_dropout.tune.study import plan_summary, tune, verdict

    if "tuner" in stages.data:
        return
    args = tune_args(name, budget, work, tmp)
    storage = tuner_storage(name, work)
    with contextlib.suppress(Exception):
        _fail_stale(open_study(f"outcome_{name}", storage))
    start = time.perf_counter()
    out = io.StringIO()
    with quiet(), contextlib.redirect_stdout(out):
        plan, ranked, _ = tune(args, console=Console(file=io.StringIO()))
    study = open_study(f"outcome_{name}", storage)
    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    epochs = budget.epochs[name]
    trial_epochs = sum(len(t.intermediate_values) for t in trials)
    rerun_epochs = sum(len(c.values) for c in ranked) * epochs
    _, label = winner(study)
    stages.data["tuner"] = {
        "plan": plan.to_yaml() if plan is not None else "sites: []\n",
        "summary": plan_summary(plan) if plan is not None else "(no sites)",
        "label": label,
        "trials": len(trials),
        "states": {k: v for k, v in states.items() if v},
        "epochs": trial_epochs + rerun_epochs,
        "trial_epochs": trial_epochs,
        "rerun_epochs": rerun_epochs,
        "candidates": [
            {"label": c.label, "values": c.values, "amount": c.amount, "summary": plan_summary(c.plan)}
            for c in ranked
        ],
        "verdict": verdict(ranked, True, study.user_attrs.get("winner_rule", "one_se"), "val_acc")
        if ranked
        else [],
        "seconds": time.perf_counter() - start,
    }
    stages.save()
    progress(
        f"{name} (c) tuner: {label}: {stages.data['tuner']['summary']} ({trial_epochs}+{rerun_epochs} epochs)"
    )


def arm_optuna(name: str, budget: Budget, work: Path, tuner: Any, stages: Stages) -> None:
    """(d): a plain Optuna objective over one global rate, until its epochs reach (c)'s (and >= its trials)."""
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from lightning_dropout import Rule
    from lightning_dropout.callback import DropoutInjector

    if "optuna" in stages.data:
        return
    target = stages.data["tuner"]["epochs"]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(work / f"{name}_optuna.journal"))
    )
    study = optuna.create_study(
        study_name=f"plain_{name}",
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=budget.selection_seed),
        pruner=optuna.pruners.MedianPruner(),
        load_if_exists=True,
    )
    _fail_stale(study)

    def objective(trial: optuna.Trial) -> float:  # the shape of Optuna's pytorch_lightning_simple.py
        import lightning.pytorch as pl

        p = trial.suggest_float("dropout", 0.0, 0.5)
        pl.seed_everything(budget.selection_seed, workers=True, verbose=False)
        injector = DropoutInjector(rules=[Rule(**GRID_RULES[name], p=p)])
        pruning = PyTorchLightningPruningCallback(trial, monitor="val_acc")
        cli = tuner.cli.fresh([injector, pruning], **trainer_kwargs(budget.limit_batches))
        with quiet():
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        trial.set_user_attr("epochs", int(cli.trainer.current_epoch))
        pruning.check_pruned()
        return float(cli.trainer.callback_metrics["val_acc"])

    def spent() -> int:
        done = study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        )
        return sum(len(t.intermediate_values) for t in done), len(done)

    start = time.perf_counter()
    while True:
        epochs, n = spent()
        if n >= budget.trials and epochs >= target:
            break
        with quiet():
            study.optimize(objective, n_trials=1)
    epochs, n = spent()
    stages.data["optuna"] = {
        "p": study.best_params["dropout"],
        "best_value": study.best_value,
        "trials": n,
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
    }
    stages.save()
    progress(
        f"{name} (d) plain Optuna: p={study.best_params['dropout']:.3f} after {n} trials, {epochs} epochs"
    )


def arm_grid(name: str, budget: Budget, tuner: Any, stages: Stages) -> None:
    """(b): every grid point on as many seeds as make its epochs reach (c)'s; the best mean value wins."""
    if "grid_choice" in stages.data:
        return
    from lightning_dropout.tune.reruns import rerun_seeds

    epochs = budget.epochs[name]
    target = stages.data["tuner"]["epochs"]
    n_seeds = max(1, math.ceil(target / (epochs * len(budget.grid))))
    seeds = [budget.selection_seed, *rerun_seeds(replace(tuner.study_config, seeds=n_seeds - 1))]
    for seed in seeds:
        for p in budget.grid:
            key = f"{p}/{seed}"
            if key not in stages.data["grid"]:
                run = selection_run(tuner, GRID_RULES[name], p, seed, budget)
                stages.data["grid"][key] = run
                stages.save()
                progress(
                    f"{name} (b) grid p={p} seed {seed}: value {run['value']:.4f} ({run['seconds']:.0f} s)"
                )
    means = {
        p: statistics.fmean(stages.data["grid"][f"{p}/{s}"]["value"] for s in seeds) for p in budget.grid
    }
    best = max(budget.grid, key=lambda p: (means[p], -p))
    stages.data["grid_choice"] = {
        "p": best,
        "means": {str(p): m for p, m in means.items()},
        "seeds": seeds,
        "epochs": len(seeds) * len(budget.grid) * epochs,
    }
    stages.save()
    progress(f"{name} (b) grid: p={best} (mean value {means[best]:.4f} over {len(seeds)} seeds)")


def run_model(name: str, budget: Budget, work: Path, tmp: Path) -> dict[str, Any]:
    from lightning_dropout import DropoutPlan, Rule
    from lightning_dropout.injection import resolve
    from lightning_dropout.tune.study import plan_summary

    stages = Stages(work / f"{name}_stages.json", budget)
    tuner = make_tuner(name, budget, tmp, CONFIG_DIR)
    full = make_tuner(name, budget, tmp, CONFIG_DIR, ("--data.init_args.val_fraction=0",))
    arm_tuner(name, budget, work, tmp, stages)
    arm_optuna(name, budget, work, tuner, stages)
    arm_grid(name, budget, tuner, stages)

    model = tuner.cli.fresh().model
    example = getattr(model, "example_input_array", None)

    def uniform(p: float) -> DropoutPlan:
        return resolve(model, [Rule(**GRID_RULES[name], p=p)], example)

    plans = {
        "none": DropoutPlan(),
        "grid": uniform(stages.data["grid_choice"]["p"]),
        "tuner": DropoutPlan.from_yaml(stages.data["tuner"]["plan"]),
        "optuna": uniform(stages.data["optuna"]["p"]),
    }
    for arm, plan in plans.items():
        for seed in budget.final_seeds:
            key = f"{arm}/{seed}/{plan.digest()}"
            if key not in stages.data["final"]:
                run = final_run(full, plan, seed, budget)
                stages.data["final"][key] = run
                stages.save()
                progress(f"{name} final {arm} seed {seed}: test {run['test']:.4f} ({run['seconds']:.0f} s)")
    result: dict[str, Any] = {
        "model": name,
        "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": budget.epochs[name],
        "paper": PAPER[name],
        "budget_epochs": {
            "tuner": stages.data["tuner"]["epochs"],
            "grid": stages.data["grid_choice"]["epochs"],
            "optuna": stages.data["optuna"]["epochs"],
            "none": 0,
        },
        "tuner": stages.data["tuner"],
        "grid": stages.data["grid_choice"],
        "optuna": stages.data["optuna"],
        "plans": {arm: plan_summary(plan) for arm, plan in plans.items()},
        "test": {},
    }
    for arm, plan in plans.items():
        runs = [stages.data["final"][f"{arm}/{s}/{plan.digest()}"] for s in budget.final_seeds]
        values = [r["test"] for r in runs]
        result["test"][arm] = {
            "values": values,
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    c = result["test"]["tuner"]["mean"]
    result["targets"] = {
        "c >= b": c >= result["test"]["grid"]["mean"],
        "c >= a": c >= result["test"]["none"]["mean"],
        "c >= d": c >= result["test"]["optuna"]["mean"],
        "c >= paper": None if PAPER[name] is None else c >= PAPER[name],
    }
    result["seconds"] = stages.elapsed()
    stages.data["result"] = result
    stages.save()
    return result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(results: dict[str, Any], partial: dict[str, Any], meta: dict[str, Any]) -> str:
    n_seeds = len(meta["final_seeds"])
    lines = [
        "# Benchmarks: tuning outcome on MNIST-1D (second edition)",
        "",
        "Does `lightning-dropout tune` find dropout that beats no dropout, a uniform rate grid and a plain Optuna "
        "objective at an equal training budget, and the MNIST-1D paper's figures? Test accuracy (%) on the 1000 "
        f"test sequences, mean ± standard deviation over {n_seeds} new seeds, each chosen configuration retrained "
        "on all 4000 training sequences and tested at the last step (the paper's protocol). Generated by "
        "`python benchmarks/outcome.py` (protocol in its docstring); raw numbers in "
        "`benchmarks/results/outcome.json` and `benchmarks/results/outcome/`.",
        "",
        "**Third edition: the budget curve** ([benchmarks-budget.md](benchmarks-budget.md), "
        "`benchmarks/budget_curve.py`): the same protocol at budgets of 5 and 10 trainings, where `tune --budget` "
        "is compared with the grid, the tuner before budgets, population-based training and one run of concrete "
        "dropout, each at the compute it used. Its figures supersede the equal-budget comparison below, which "
        "spent about 33 trainings per arm.",
        "",
    ]
    if meta.get("quick"):
        lines += ["**`--quick` smoke run: tiny budget, the numbers mean nothing.**", ""]
    if partial:
        lines += [
            f"**Partial: {', '.join(sorted(partial))} not finished yet** (see the end of this page).",
            "",
        ]
    lines += [
        "## Summary",
        "",
        "| model | epochs | (a) no dropout | (b) grid | (c) tune | (d) plain Optuna | paper | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in MODELS:
        if name not in results:
            continue
        r = results[name]
        t = r["test"]
        cells = [f"{pct(t[a]['mean'])} ± {pct(t[a]['std'])}" for a in ARMS]
        flags = ", ".join(
            f"{k}: {'met' if v else '**missed**'}" for k, v in r["targets"].items() if v is not None
        )
        paper = "-" if r["paper"] is None else pct(r["paper"])
        lines.append(
            f"| {MODEL_TEXT[r['model']]} | {r['epochs']} | " + " | ".join(cells) + f" | {paper} | {flags} |"
        )
    lines += ["", "## Per model", ""]
    for name in MODELS:
        if name not in results:
            continue
        r = results[name]
        b, c, d = r["grid"], r["tuner"], r["optuna"]
        lines += [
            f"### {MODEL_TEXT[r['model']]} ("
            + (f"{r['model_class']}, " if r["model_class"] != MODEL_TEXT[r["model"]] else "")
            + f"{r['parameters']:,} parameters, {r['epochs']} epochs, "
            f"{r['seconds'] / 60:.0f} min)",
            "",
            "| arm | chosen | selection epochs | test per seed | mean ± std |",
            "|---|---|---:|---|---:|",
        ]
        for arm in ARMS:
            t = r["test"][arm]
            lines.append(
                f"| {ARM_TEXT[arm]} | {r['plans'][arm]} | {r['budget_epochs'][arm]} | "
                + ", ".join(pct(v) for v in t["values"])
                + f" | {pct(t['mean'])} ± {pct(t['std'])} |"
            )
        states = ", ".join(f"{v} {k}" for k, v in c["states"].items())
        lines += [
            "",
            f"- (b) {GRID_TEXT[name]}; p chosen: {b['p']:g} (mean trial value over {len(b['seeds'])} seeds: "
            + ", ".join(f"{p}: {pct(m)}" for p, m in b["means"].items())
            + ").",
            f"- (c) {c['trials']} trials ({states}), winner {c['label']}; re-run candidates (validation value per "
            "seed): "
            + "; ".join(f"{x['label']} {', '.join(pct(v) for v in x['values'])}" for x in c["candidates"])
            + ".",
            *[f"  - {line}" for line in c["verdict"]],
            f"- (d) {d['trials']} trials ({d['pruned']} pruned by Optuna's default median rule, which compares "
            "from the first epochs, where dropout still trails: its budget goes to many short trials), "
            f"p = {d['p']:.3f} (last-epoch val_acc "
            f"{pct(d['best_value'])}).",
            "",
        ]
    if partial:
        lines += ["## Not finished", ""]
        for name, st in sorted(partial.items()):
            if not st:
                lines.append(
                    f"- {name}: arm (c)'s study is under way (its journal is in `benchmarks/results/outcome/`). "
                    f"Resume with `python benchmarks/outcome.py --models {name}`."
                )
                continue
            done = [k for k in ("tuner", "optuna", "grid_choice") if k in st]
            lines.append(
                f"- {name}: {st.get('elapsed', 0.0) / 60:.0f} min spent; arms selected: {done or 'none'}; "
                f"{len(st.get('grid', {}))} grid runs, {len(st.get('final', {}))} final runs done. Resume with "
                "`python benchmarks/outcome.py --models " + name + "`."
            )
        lines.append("")
    lines += [
        "## Protocol and noise",
        "",
        "- Data: MNIST-1D with the paper's defaults (data seed 42), 4000 training and 1000 test sequences. "
        "Selection (every arm) trains on 3600 and validates on the other 400; the final runs train on all 4000 "
        "and touch the test set once, at the last step.",
        "- Training: Adam, batch 100, learning rate 1e-2 (1e-3 for the Transformer), epochs per model as in the "
        "tables (the paper: 150 epochs = 6000 steps). Every process pins torch to one thread.",
        "- (c) is `lightning-dropout tune` with `benchmarks/configs/outcome_<model>.yaml`: the tuner's defaults "
        "except `study.prune_after: 0.5`, the default when this edition ran (0.2 since).",
        "- Equal budget: (c)'s epochs (its trials, pruned ones by the epochs they ran, plus its re-runs) set the "
        "budget; (b) runs each grid point on as many seeds as reach it and (d) runs trials until it reaches it "
        "(and at least as many trials as (c)). (a) has nothing to select.",
        "- Noise: one test sequence is 0.1 pp; the seed-to-seed spread of one configuration is about 1-2 pp, so "
        f"with {n_seeds} seeds a difference of means below about 1.5 pp is within the noise.",
        f"- Machine: {meta['machine']}; {meta['date']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    work: Path, json_path: Path, md_path: Path, meta: dict[str, Any], models: tuple[str, ...]
) -> dict:
    results, partial = {}, {}
    for name in models:
        path = work / f"{name}_stages.json"
        if not path.is_file():
            if (work / f"{name}_tuner.journal").is_file():  # started: arm (c)'s study is under way
                partial[name] = {}
            continue
        st = json.loads(path.read_text())
        if "result" in st:
            results[name] = st["result"]
        else:
            partial[name] = st
    data = {"meta": meta, "models": results, "partial": sorted(partial)}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(results, partial, meta))
    return data


def _meta(budget: Budget, quick: bool) -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import lightning
        import optuna
        import torch

        versions.update(torch=torch.__version__, lightning=lightning.__version__, optuna=optuna.__version__)
    return {
        "quick": quick,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "versions": versions,
        "epochs": budget.epochs,
        "trials": budget.trials,
        "final_seeds": list(budget.final_seeds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="stages files and study journals")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="write outcome.json and benchmarks.md here"
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: MLP, 2 epochs, 3 trials, 1 seed")
    ns = parser.parse_args(argv)
    budget = QUICK if ns.quick else FULL
    models = tuple(m for m in ns.models.split(",") if m)
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models must be among {list(MODELS)}, but got {unknown}")
    if not ns.quick:
        budget = replace(budget, models=models)
    json_path = ns.out_dir / "outcome.json" if ns.out_dir else DEFAULT_JSON
    md_path = ns.out_dir / "benchmarks.md" if ns.out_dir else DEFAULT_MD
    work = ns.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    meta = _meta(budget, ns.quick)
    if not ns.report_only:
        os.environ.update(THREAD_ENV)
        import torch

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(prefix="ld-outcome-") as tmp:
            prepare_data(Path(tmp) / "data")
            for name in budget.models:
                progress(f"{name}: {budget.epochs[name]} epochs per run, {budget.trials} trials")
                run_model(name, budget, work, Path(tmp))
                write_report(work, json_path, md_path, meta, MODELS)
    write_report(work, json_path, md_path, meta, budget.models if ns.quick else MODELS)
    progress(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
