"""Tuning outcome on MNIST-1D, third edition: the budget curve. What does each method give for the trainings a
user can afford? (issue: "Tuning at the budget a user can afford")

The protocol of the second edition (``benchmarks/outcome.py``): selection on a 3600 / 400 split of MNIST-1D's
4000 training sequences; every chosen configuration retrained on all 4000 on 3 new seeds (the same 3 for every
arm) and tested once, at the last step. The models train for the paper's 150 epochs.

For each model, budget B (in trainings of the model: ``max_epochs`` epochs each) and study seed s (the tuner's
own randomness is part of what a user gets), the arms:

(a) ``none``: no dropout (nothing to select; one cell per model).
(b) ``grid``: the uniform grid that fits B trainings: the obvious variant at p in {0.1, ..., 0.5}, each rate on
    B // 5 seeds (s, s + 1000, ...); the best mean trial value wins.
(c0) ``today``: the tuner as it was before budgets, scaled to B: ``study.n_trials = B`` (baseline, the 4-point
    warm-start grid, sampled trials, median pruning from 20 % of the epochs), no re-runs (``seeds: 0``, which B
    trainings cannot pay for), the best trial value wins.
(c) ``budget``: ``lightning-dropout tune`` with ``study.budget = B`` and nothing else set: the budget plan (the
    grid cut to B, trials while a whole training fits beside the race's reserve) and the race over seeds.
(e) ``concrete``: one-run learned rates: concrete dropout on every site (initial p = 0.1), in a single training
    (the final runs are the method; its selection costs nothing).
(f) ``pbt``: population-based training over the per-site rates (``study.method: pbt``, ``study.budget = B``: a
    population of B members, exploit/explore every 10 % of the epochs); the best member's rate schedule is
    retrained as a scheduled plan.

Every arm reports the compute it used (not the budget it was given). Resumable: every finished run is saved at
once in ``<work-dir>/<model>_budget_stages.json``, the studies live in journal files beside it; running again
continues. ``--report-only`` rewrites the report (``docs/benchmarks-budget.md``, the third edition of ``docs/benchmarks.md``) from what is done.

Usage::

    python benchmarks/budget_curve.py --models mlp & python benchmarks/budget_curve.py --models cnn
    python benchmarks/budget_curve.py --models gru --budgets 10 --arms none,grid,budget  # the GRU, default B
    python benchmarks/budget_curve.py --report-only
    python benchmarks/budget_curve.py --quick --work-dir /tmp/x --out-dir /tmp/x   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import outcome
from outcome import (
    CONFIG_DIR,
    GRID_RULES,
    MODEL_TEXT,
    REPO,
    THREAD_ENV,
    _fail_stale,
    _meta,
    final_run,
    make_tuner,
    prepare_data,
    progress,
    quiet,
    selection_run,
)

WORK_DIR = REPO / "benchmarks" / "results" / "budget"
DEFAULT_MD = REPO / "docs" / "benchmarks-budget.md"
MODELS = ("mlp", "cnn", "gru")
RATES = (0.1, 0.2, 0.3, 0.4, 0.5)
ARMS = ("none", "grid", "today", "budget", "concrete", "pbt")
ARM_TEXT = {
    "none": "(a) no dropout",
    "grid": "(b) uniform grid",
    "today": "(c0) tune, before budgets",
    "budget": "(c) tune --budget",
    "concrete": "(e) concrete, one run",
    "pbt": "(f) population-based training",
}
GRU_BUDGET = 10.0  # the GRU runs at the default budget (`--models gru --budgets 10 --arms none,grid,budget`)
SECOND_EDITION = {"mlp": 0.705, "cnn": 0.950, "gru": None}  # (c) at about 33 trainings (docs/benchmarks.md)


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    epochs: dict[str, int]
    budgets: tuple[float, ...]
    study_seeds: tuple[int, ...] = (0, 1)
    final_seeds: tuple[int, ...] = (1, 2, 3)
    limit_batches: int | None = None
    quick: bool = False
    arms: tuple[str, ...] = ARMS


FULL = Plan(models=("mlp", "cnn"), epochs={"mlp": 150, "cnn": 150, "gru": 150}, budgets=(5.0, 10.0))
QUICK = Plan(
    models=("mlp",),
    epochs={"mlp": 2},
    budgets=(5.0,),
    study_seeds=(0,),
    final_seeds=(1,),
    limit_batches=3,
    quick=True,
)


class Stages(outcome.Stages):
    """What a model's run has done (``<work>/<model>_budget_stages.json``), saved after every training run (the
    second edition's stages file, with this edition's key and sections)."""

    def __init__(self, path: Path, plan: Plan, name: str) -> None:
        self.path = path
        self.key = {"epochs": plan.epochs[name], "quick": plan.quick}
        self.data: dict[str, Any] = {"key": self.key, "cells": {}, "grid": {}, "final": {}, "elapsed": 0.0}
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("key") == self.key:
                self.data = old
                progress(f"resuming from {path}")
        self.base = float(self.data.get("elapsed", 0.0))
        self.started = time.perf_counter()


def _cell(budget: float, seed: int, arm: str) -> str:
    return f"B{budget:g}/s{seed}/{arm}"


def arm_grid(name: str, plan: Plan, tuner: Any, stages: Stages, budget: float, seed: int) -> None:
    key = _cell(budget, seed, "grid")
    if key in stages.data["cells"]:
        return
    n_seeds = max(1, int(budget // len(RATES)))
    seeds = [seed + 1000 * i for i in range(n_seeds)]
    for s in seeds:
        for p in RATES:
            run_key = f"{p}/{s}"
            if run_key not in stages.data["grid"]:
                cfg_run = selection_run(tuner, GRID_RULES[name], p, s, _outcome_budget(plan))
                stages.data["grid"][run_key] = cfg_run
                stages.save()
                progress(f"{name} grid p={p} seed {s}: {cfg_run['value']:.4f} ({cfg_run['seconds']:.0f} s)")
    means = {p: statistics.fmean(stages.data["grid"][f"{p}/{s}"]["value"] for s in seeds) for p in RATES}
    best = max(RATES, key=lambda p: (means[p], -p))
    stages.data["cells"][key] = {
        "kind": "uniform",
        "p": best,
        "means": {str(p): m for p, m in means.items()},
        "trainings": float(len(seeds) * len(RATES)),
        "summary": f"uniform {GRID_RULES[name]['variant']} {best:g}",
    }
    stages.save()


def _outcome_budget(plan: Plan) -> Any:
    """The second edition's Budget object its helpers take (only ``limit_batches`` is read)."""
    from outcome import Budget

    return Budget(models=plan.models, epochs=plan.epochs, trials=0, limit_batches=plan.limit_batches)


def _tune_args(name: str, plan: Plan, work: Path, tmp: Path, study: str, extra: list[str]) -> list[str]:
    args = [
        "--config",
        str(CONFIG_DIR / f"outcome_{name}.yaml"),
        f"--trainer.max_epochs={plan.epochs[name]}",
        f"--data.init_args.cache_dir={tmp / 'data'}",
        f"--study.name={study}",
        f"--study.run_dir={tmp / 'runs'}",
        f"--study.storage=journal:{work / f'{study}.journal'}",
        "--study.prune_after=0.2",  # today's default (the outcome configs pin the second edition's 0.5)
        *extra,
    ]
    if plan.limit_batches is not None:
        n = plan.limit_batches
        args += [f"--trainer.limit_train_batches={n}", f"--trainer.limit_val_batches={n}"]
    if plan.quick:
        args += ["--study.gap_samples=0"]
    return args


def arm_tune(
    name: str, plan: Plan, work: Path, tmp: Path, stages: Stages, budget: float, seed: int, arm: str
) -> None:
    """(c0), (c) or (f): a real ``tune`` in this process, its study in a journal beside the stages file."""
    from rich.console import Console

    from lightning_dropout.tune.budget import compute_used, rerun_runs
    from lightning_dropout.tune.records import open_study, winner
    from lightning_dropout.tune.study import plan_summary, tune

    key = _cell(budget, seed, arm)
    if key in stages.data["cells"]:
        return
    study = f"budget_{name}_B{budget:g}_s{seed}_{arm}"
    budgeted = [
        f"--study.budget={budget:g}",
        "--study.n_trials=null",
        "--study.top_k=null",
        "--study.seeds=null",
    ]
    sizes = {
        "budget": budgeted,
        "pbt": [*budgeted, "--study.method=pbt"],
        "today": ["--study.budget=null", f"--study.n_trials={int(budget)}", "--study.seeds=0"],
    }[arm]
    args = _tune_args(name, plan, work, tmp, study, [f"--study.seed={seed}", *sizes])
    journal = work / f"{study}.journal"
    if arm == "pbt" and journal.is_file():  # its checkpoints died with the last run's temporary folder
        journal.unlink()
    with contextlib.suppress(Exception):
        _fail_stale(open_study(study, f"journal:{work / f'{study}.journal'}"))
    start = time.perf_counter()
    with quiet(), contextlib.redirect_stdout(io.StringIO()):
        chosen, ranked, _ = tune(args, console=Console(file=io.StringIO()))
    opened = open_study(study, f"journal:{work / f'{study}.journal'}")
    _, label = winner(opened)
    used = compute_used(opened, plan.epochs[name])
    stages.data["cells"][key] = {
        "kind": "plan",
        "plan": chosen.to_yaml() if chosen is not None else "sites: []\n",
        "summary": plan_summary(chosen) if chosen is not None else "(no sites)",
        "label": label,
        "trials": len(opened.trials),
        "trainings": used,
        "rerun_trainings": rerun_runs(opened),
        "candidates": [
            {"label": c.label, "values": c.values, "dropped_after": c.dropped_after} for c in ranked
        ],
        "seconds": time.perf_counter() - start,
    }
    stages.save()
    progress(f"{name} {key}: {label}: {stages.data['cells'][key]['summary']} ({used:.1f} trainings)")


def _tuner(name: str, plan: Plan, tmp: Path, *extra: str) -> Any:
    """A Tuner of the model's config at the plan's length (its CLI builds every run's model, data, trainer)."""
    sizes = ("--study.n_trials=20", f"--trainer.max_epochs={plan.epochs[name]}")
    return make_tuner(name, _outcome_budget(plan), tmp, CONFIG_DIR, (*sizes, *extra))


def _plans(name: str, plan: Plan, tuner: Any, stages: Stages) -> dict[str, Any]:
    """cell key -> the DropoutPlan to retrain (the cells selected so far, plus (a) and (e))."""
    from lightning_dropout import DropoutPlan, Rule
    from lightning_dropout.injection import resolve

    model = tuner.cli.fresh().model
    example = getattr(model, "example_input_array", None)
    out: dict[str, Any] = {"none": DropoutPlan()}
    if "concrete" in plan.arms:
        concrete = {**GRID_RULES[name], "variant": "concrete"}
        out["concrete"] = resolve(model, [Rule(**concrete, p=0.1)], example)
    for key, cell in stages.data["cells"].items():
        if cell["kind"] == "uniform":
            out[key] = resolve(model, [Rule(**GRID_RULES[name], p=cell["p"])], example)
        else:
            out[key] = DropoutPlan.from_yaml(cell["plan"])
    return out


def finals(name: str, plan: Plan, full: Any, tuner: Any, stages: Stages) -> None:
    for key, dropout in _plans(name, plan, tuner, stages).items():
        for seed in plan.final_seeds:
            run_key = f"{seed}/{dropout.digest()}"
            if run_key not in stages.data["final"]:
                run = final_run(full, dropout, seed, _outcome_budget(plan))
                stages.data["final"][run_key] = run
                stages.save()
                progress(f"{name} final {key} seed {seed}: test {run['test']:.4f} ({run['seconds']:.0f} s)")


def run_model(name: str, plan: Plan, work: Path, tmp: Path) -> None:
    stages = Stages(work / f"{name}_budget_stages.json", plan, name)
    tuner = _tuner(name, plan, tmp)
    full = _tuner(name, plan, tmp, "--data.init_args.val_fraction=0")
    finals(name, plan, full, tuner, stages)  # (a) and (e) first: they need no selection
    for budget in plan.budgets:
        for seed in plan.study_seeds:
            if "grid" in plan.arms:
                arm_grid(name, plan, tuner, stages, budget, seed)
            for arm in ("budget", "today", "pbt"):
                if arm in plan.arms:
                    arm_tune(name, plan, work, tmp, stages, budget, seed, arm)
            finals(name, plan, full, tuner, stages)


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _tests(stages: dict[str, Any], dropout: Any, seeds: tuple[int, ...]) -> list[float] | None:
    runs = [stages["final"].get(f"{s}/{dropout.digest()}") for s in seeds]
    return None if any(r is None for r in runs) else [r["test"] for r in runs]


def summarize(name: str, plan: Plan, stages: dict[str, Any], tuner: Any) -> dict[str, Any]:
    """Per arm and budget: the test accuracies over study seeds x final seeds and the trainings used."""
    holder = Stages.__new__(Stages)
    holder.data = stages
    plans = _plans(name, plan, tuner, holder)
    out: dict[str, Any] = {"arms": {}, "cells": {}}
    for arm in ("none", "concrete"):
        values = _tests(stages, plans[arm], plan.final_seeds) if arm in plans else None
        if values is not None:
            out["arms"][arm] = {"0": {"values": values, "trainings": [0.0 if arm == "none" else 1.0]}}
    for key, cell in stages["cells"].items():
        budget, _seed, arm = key.split("/")
        values = _tests(stages, plans[key], plan.final_seeds)
        out["cells"][key] = {"summary": cell["summary"], "trainings": cell["trainings"], "test": values}
        if values is None:
            continue
        slot = out["arms"].setdefault(arm, {}).setdefault(budget[1:], {"values": [], "trainings": []})
        slot["values"] += values
        slot["trainings"].append(cell["trainings"])
    return out


def _mean(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * sd:.1f}"


def targets(name: str, summary: dict[str, Any], budgets: tuple[float, ...]) -> list[str]:
    arms = summary["arms"]
    if name == "gru":  # run at the default budget only
        budgets = (GRU_BUDGET,)

    def mean(arm: str, budget: float) -> float | None:
        slot = arms.get(arm, {}).get(f"{budget:g}")
        return statistics.fmean(slot["values"]) if slot and slot["values"] else None

    lines = []
    floor = {"mlp": 0.700, "cnn": 0.945}.get(name)
    c10 = mean("budget", 10)
    if floor is not None:
        lines.append(
            f"(c) at B = 10 >= {100 * floor:.1f}: "
            + (
                "not measured yet"
                if c10 is None
                else f"{100 * c10:.1f}, {'met' if c10 >= floor else 'missed'}"
            )
        )

    def versus(label: str, c: float | None, ref: float | None, margin: float = 0.0) -> str:
        if c is None or ref is None:
            return f"{label}: not measured yet"
        plus = f" + {100 * margin:.1f}" if margin else ""
        return f"{label}: {100 * c:.1f} vs {100 * ref:.1f}{plus}, {'met' if c >= ref + margin else 'missed'}"

    lines += [versus(f"(c) >= (b) at B = {b:g}", mean("budget", b), mean("grid", b)) for b in budgets]
    if name == "mlp":
        lines.append(
            versus("moonshot (c) at B = 5 >= (b) at B = 5 + 1 pp", mean("budget", 5), mean("grid", 5), 0.01)
        )
    if name == "gru":
        c = next((mean("budget", b) for b in budgets if mean("budget", b) is not None), None)
        state = "not measured yet" if c is None else f"{100 * c:.1f}, {'met' if c >= 0.91 else 'missed'}"
        lines.append(f"(c) >= 91 (the paper): {state}")
    return lines


def figure(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    """Test accuracy against trainings used, one line per arm, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in MODELS if n in summaries]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for arm, slots in summaries[name]["arms"].items():
            points = sorted(
                (statistics.fmean(s["trainings"]), 100 * statistics.fmean(s["values"]))
                for s in slots.values()
                if s["values"]
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=ARM_TEXT[arm])
        if SECOND_EDITION.get(name):
            ax.axhline(
                100 * SECOND_EDITION[name], ls=":", c="grey", label="(c), second edition (~33 trainings)"
            )
        ax.set_title(f"{MODEL_TEXT[name]}, 150 epochs")
        ax.set_xlabel("trainings used (selection)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(work: Path, md_path: Path, plan: Plan, meta: dict[str, Any], tmp: Path) -> None:
    summaries: dict[str, dict[str, Any]] = {}
    for name in MODELS:
        path = work / f"{name}_budget_stages.json"
        if not path.is_file():
            continue
        stages = json.loads(path.read_text())
        tuner = _tuner(name, plan, tmp)
        summaries[name] = summarize(name, plan, stages, tuner)
        summaries[name]["elapsed"] = stages.get("elapsed", 0.0)
    png = md_path.parent / "images" / "budget_curve.png"
    figure(summaries, png)
    lines = [
        "# Benchmarks: the budget curve (tuning outcome, third edition)",
        "",
        "What does each method give for the trainings a user can afford? Test accuracy (%) on MNIST-1D's 1000 "
        "test sequences, mean ± standard deviation over the study seeds x 3 final seeds (each chosen "
        "configuration retrained on all 4000 training sequences, tested once at the last step), against the "
        "trainings each arm used for selection (one training = 150 epochs). Generated by "
        "`python benchmarks/budget_curve.py` (protocol in its docstring); raw numbers in "
        "`benchmarks/results/budget/`.",
        "",
    ]
    if plan.quick:
        lines += ["**`--quick` smoke run: the numbers mean nothing.**", ""]
    lines += [f"![test accuracy against trainings used](images/{png.name})", ""]
    for name, summary in summaries.items():
        lines += [
            f"## {MODEL_TEXT[name]} ({summary['elapsed'] / 60:.0f} min so far)",
            "",
            "| arm | B | trainings used (mean) | test % | runs |",
            "|---|---:|---:|---:|---:|",
        ]
        for arm in ARMS:
            for budget, slot in sorted(summary["arms"].get(arm, {}).items(), key=lambda kv: float(kv[0])):
                used = statistics.fmean(slot["trainings"])
                lines.append(
                    f"| {ARM_TEXT[arm]} | {budget if budget != '0' else '-'} | {used:.1f} | "
                    f"{_mean(slot['values'])} | {len(slot['values'])} |"
                )
        lines += ["", "Targets:", ""]
        lines += [f"- {t}" for t in targets(name, summary, plan.budgets)]
        lines += [
            "",
            "Cells (budget / study seed / arm: the choice, the trainings it used, test per final seed):",
            "",
        ]
        for key, cell in sorted(summary["cells"].items()):
            tests = (
                "not retrained yet"
                if cell["test"] is None
                else ", ".join(f"{100 * v:.1f}" for v in cell["test"])
            )
            lines.append(f"- `{key}`: {cell['summary']}; {cell['trainings']:.1f} trainings; {tests}")
        lines.append("")
    missing = [n for n in (*plan.models, "gru") if n not in summaries]
    if missing:
        lines += [f"Not started yet: {', '.join(missing)}.", ""]
    lines += [
        "## Protocol and noise",
        "",
        "- The second edition's protocol (`docs/benchmarks.md`): Adam 1e-2, batch 100, 150 epochs; selection on "
        "3600 / 400, final runs on all 4000, the test set touched once.",
        "- Study seeds 0 and 1 for every (model, B, arm) cell; the final seeds 1, 2, 3 are the same for every "
        "arm. One test sequence is 0.1 pp; one configuration's seed-to-seed spread is 1-2 pp.",
        f"- Machine: {meta['machine']}; {meta['date']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
    ]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn", help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--budgets", default=None, help="comma-separated budgets in trainings (default 5,10)")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR)
    parser.add_argument("--out-dir", type=Path, default=None, help="write the report here")
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)} (default: all)"
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: MLP, 2 epochs, B = 5, 1 seed")
    ns = parser.parse_args(argv)
    plan = QUICK if ns.quick else FULL
    if not ns.quick:
        models = tuple(m for m in ns.models.split(",") if m)
        unknown = sorted(set(models) - set(MODELS))
        if unknown:
            parser.error(f"--models must be among {list(MODELS)}, but got {unknown}")
        plan = replace(plan, models=models)
    arms = tuple(a for a in ns.arms.split(",") if a)
    if sorted(set(arms) - set(ARMS)):
        parser.error(f"--arms must be among {list(ARMS)}, but got {sorted(set(arms) - set(ARMS))}")
    plan = replace(plan, arms=arms)
    if ns.budgets:
        plan = replace(plan, budgets=tuple(float(b) for b in ns.budgets.split(",")))
    md_path = ns.out_dir / "benchmarks-budget.md" if ns.out_dir else DEFAULT_MD
    work = ns.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(THREAD_ENV)
    import torch

    torch.set_num_threads(1)
    meta = _meta(_outcome_budget(plan), plan.quick)
    with tempfile.TemporaryDirectory(prefix="ld-budget-") as tmp:
        prepare_data(Path(tmp) / "data")
        if not ns.report_only:
            for name in plan.models:
                progress(f"{name}: {plan.epochs[name]} epochs per run, budgets {plan.budgets}")
                run_model(name, plan, work, Path(tmp))
                report(work, md_path, plan, meta, Path(tmp))
        report(work, md_path, plan, meta, Path(tmp))
    progress(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
