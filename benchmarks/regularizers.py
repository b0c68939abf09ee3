"""Which regularizer, and does combining help? Dropout against L2 weight decay and early stopping on MNIST-1D
(issue 12, part 7) -> ``docs/regularizers.md``.

For the MNIST-1D MLP and CNN (``benchmarks/configs/outcome_<model>.yaml``: Adam 1e-2, batch 100), every arm trains
runs of the same length (``EPOCHS``) and selects on the 3600 / 400 split of the 4000 training sequences:

* ``none``: no regularization (nothing to select);
* ``early_stop``: no regularization, stopped at the epoch with the best mean validation accuracy over 3 selection
  seeds (the epoch count is what is selected);
* ``l2``: Adam's (L2) ``weight_decay`` tuned by ``lightning-dropout tune`` (a ``search:`` entry, log-uniform in
  [1e-6, 1e-1]; dropout fixed at 0);
* ``dropout``: dropout tuned by ``lightning-dropout tune`` with its defaults (the config's groups);
* ``both``: dropout and weight decay tuned together in one study.

The three studies run the tuner's defaults (baselines, warm start where there is dropout, pruning, paired
re-runs of the candidates over 3 seeds, the one-SE winner rule) with the same number of trials.

Final runs: each arm's choice is retrained on all 4000 training sequences for ``EPOCHS`` epochs (the early
stopping arm: its chosen epoch count) with 3 new seeds and tested once, at the last step. Reported per arm:
test accuracy (mean +- std over the seeds) and the generalization gap at that step measured with dropout off:
the training accuracy (all 4000 training sequences evaluated in eval mode) minus the test accuracy.

Resumable: each finished run is saved at once in ``benchmarks/results/regularizers/<model>.json``; the studies
live in journal files beside it. Usage::

    python benchmarks/regularizers.py                    # mlp and cnn -> docs/regularizers.md
    python benchmarks/regularizers.py --models cnn       # one model (run two processes for both)
    python benchmarks/regularizers.py --report-only
    python benchmarks/regularizers.py --quick --work-dir /tmp/r --out /tmp/r/regularizers.md   # smoke test
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
import tempfile
import time
from pathlib import Path
from typing import Any

from common import cpu_model, markdown_table, quiet

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "benchmarks" / "configs"
WORK_DIR = REPO / "benchmarks" / "results" / "regularizers"
DEFAULT_MD = REPO / "docs" / "regularizers.md"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

MODELS = ("mlp", "cnn")
EPOCHS = 60
TRIALS = 12
FINAL_SEEDS = (1, 2, 3)
SELECTION_SEEDS = (0, 1000, 2000)
WD = "model.init_args.weight_decay"
WD_SEARCH = {WD: {"low": 1e-6, "high": 1e-1, "log": True}}
ARMS = ("none", "early_stop", "l2", "dropout", "both")
ARM_TEXT = {
    "none": "no regularization",
    "early_stop": "early stopping only",
    "l2": "L2 weight decay, tuned",
    "dropout": "dropout, tuned",
    "both": "dropout + weight decay, tuned together",
}


def progress(msg: str) -> None:
    import sys

    sys.stderr.write(f"[regularizers {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


class Settings:
    def __init__(self, quick: bool, epochs: int | None = None) -> None:
        self.quick = quick
        self.epochs = 2 if quick else epochs or EPOCHS
        # a run at another length than the default keeps its own state, studies and journals
        self.suffix = f"_e{self.epochs}" if not quick and self.epochs != EPOCHS else ""
        self.trials = 3 if quick else TRIALS
        self.final_seeds = (1,) if quick else FINAL_SEEDS
        self.selection_seeds = (0, 1000) if quick else SELECTION_SEEDS
        self.limit = 3 if quick else None

    def key(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "trials": self.trials, "quick": self.quick}

    def overrides(self) -> list[str]:
        args = [f"--trainer.max_epochs={self.epochs}"]
        if self.limit:
            args += [
                f"--trainer.limit_train_batches={self.limit}",
                f"--trainer.limit_val_batches={self.limit}",
            ]
            args += [f"--trainer.limit_test_batches={self.limit}", "--study.gap_samples=0"]
            args += ["--study.seeds=2", "--study.top_k=1", "--study.warm_start_rates=[0.1]"]
        return args


class State:
    """One model's finished work (``<work>/<model>.json``), saved after every run."""

    def __init__(self, path: Path, settings: Settings) -> None:
        self.path = path
        self.data: dict[str, Any] = {"key": settings.key(), "studies": {}, "selection": {}, "final": {}}
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("key") == settings.key():
                self.data = old
                progress(f"resuming from {path}")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def base_args(model: str, settings: Settings, tmp: Path) -> list[str]:
    return [
        "--config",
        str(CONFIG_DIR / f"outcome_{model}.yaml"),
        f"--data.init_args.cache_dir={tmp / 'data'}",
        *settings.overrides(),
    ]


def study_name(model: str, arm: str, settings: Settings) -> str:
    return f"reg_{model}_{arm}{settings.suffix}"


def journal(model: str, arm: str, settings: Settings, work: Path) -> Path:
    return work / (
        f"{model}_{arm}.journal" if settings.epochs == EPOCHS else f"{model}_{arm}_e{settings.epochs}.journal"
    )


def state_path(model: str, settings: Settings, work: Path) -> Path:
    return work / f"{model}{settings.suffix}.json"


def study_args(model: str, arm: str, settings: Settings, work: Path, tmp: Path) -> list[str]:
    """The ``tune`` arguments of a tuned arm."""
    args = [
        *base_args(model, settings, tmp),
        f"--study.name={study_name(model, arm, settings)}",
        f"--study.run_dir={tmp / 'runs'}",
        f"--study.storage=journal:{journal(model, arm, settings, work)}",
        f"--study.n_trials={settings.trials}",
        "--study.seed=0",
    ]
    if arm in ("l2", "both"):
        args.append(f"--search={json.dumps(WD_SEARCH)}")
    if arm == "l2":  # dropout fixed at 0: one group, rate [0, 0], nothing sampled for it
        match = "Linear" if model == "mlp" else "Conv1d"
        group = {
            "name": "off",
            "select": {"match": match},
            "variants": ["standard"],
            "p": [0.0, 0.0],
            "params": {},  # every field: jsonargparse merges a list item given on the command line into the file's
            "per_layer": False,
            "log": False,
            "depth_scaling": ["none"],
        }
        args += [f"--dropout.groups={json.dumps([group])}", "--study.warm_start=false"]
    return args


def tuned_arm(model: str, arm: str, settings: Settings, work: Path, tmp: Path, state: State) -> None:
    from rich.console import Console

    from lightning_dropout.tune.records import SEARCH_ATTR, open_study, winner_trial
    from lightning_dropout.tune.study import plan_summary, tune

    if arm in state.data["studies"]:
        return
    start = time.perf_counter()
    args = study_args(model, arm, settings, work, tmp)
    with quiet(), contextlib.redirect_stdout(io.StringIO()):
        plan, ranked, _ = tune(args, console=Console(file=io.StringIO()))
    study = open_study(study_name(model, arm, settings), f"journal:{journal(model, arm, settings, work)}")
    chosen = winner_trial(study)
    trials = study.get_trials(deepcopy=False)
    values = chosen.user_attrs.get(SEARCH_ATTR) or {}
    state.data["studies"][arm] = {
        "plan": plan.to_yaml() if plan is not None else "sites: []\n",
        "summary": plan_summary(plan) if plan is not None else "(no sites)",
        "weight_decay": values.get(WD, 0.0),
        "trial": chosen.number,
        "trials": len(trials),
        "epochs": sum(len(t.intermediate_values) for t in trials)
        + sum(len(c.values) for c in ranked) * settings.epochs,
        "seconds": time.perf_counter() - start,
    }
    state.save()
    info = state.data["studies"][arm]
    progress(
        f"{model} {arm}: {info['summary']}, weight_decay {info['weight_decay']:.2g} ({info['epochs']} epochs)"
    )


def early_stop_arm(model: str, settings: Settings, tuner: Any, state: State) -> None:
    """Selection runs without regularization; the chosen epoch count maximizes the mean validation accuracy."""
    import lightning.pytorch as pl
    from outcome import curve_callback, trainer_kwargs

    for seed in settings.selection_seeds:
        if str(seed) in state.data["selection"]:
            continue
        start = time.perf_counter()
        pl.seed_everything(seed, workers=True, verbose=False)
        curve = curve_callback()
        cli = tuner.cli.fresh([curve], **trainer_kwargs(settings.limit))
        with quiet():
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        state.data["selection"][str(seed)] = curve.curves["val_acc"]
        state.save()
        progress(f"{model} early_stop selection seed {seed} ({time.perf_counter() - start:.0f} s)")


def chosen_epochs(state: State, settings: Settings) -> int:
    curves = [state.data["selection"][str(s)] for s in settings.selection_seeds]
    mean = [statistics.fmean(values) for values in zip(*curves, strict=True)]
    return max(range(len(mean)), key=lambda i: mean[i]) + 1


def final_run(
    full: Any, plan: Any, weight_decay: float, epochs: int, seed: int, limit: int | None
) -> dict[str, Any]:
    """All 4000 training sequences, ``epochs`` epochs; test accuracy at the last step and the training accuracy
    in eval mode (dropout off) at that step."""
    import lightning.pytorch as pl
    from outcome import trainer_kwargs

    from lightning_dropout.callback import DropoutInjector

    start = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    callbacks = [DropoutInjector(plan=plan, dropout_seed=seed)] if len(plan) else []
    cli = full.cli.fresh(callbacks, values={WD: weight_decay}, max_epochs=epochs, **trainer_kwargs(limit))
    with quiet():
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        (test,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        train_loader = cli.datamodule.train_dataloader()
        (train,) = cli.trainer.validate(cli.model, dataloaders=train_loader, verbose=False)
    return {
        "seed": seed,
        "test": float(test["test_acc"]),
        "train_clean": float(train["val_acc"]),
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
    }


def run_model(model: str, settings: Settings, work: Path, tmp: Path) -> dict[str, Any]:
    from lightning_dropout import DropoutPlan
    from lightning_dropout.tune import Tuner

    state = State(state_path(model, settings, work), settings)
    with quiet():
        tuner = Tuner([*study_args(model, "dropout", settings, work, tmp)])
        full = Tuner([*study_args(model, "dropout", settings, work, tmp), "--data.init_args.val_fraction=0"])
    for arm in ("dropout", "l2", "both"):
        tuned_arm(model, arm, settings, work, tmp, state)
    early_stop_arm(model, settings, tuner, state)
    stop_at = chosen_epochs(state, settings)
    choices: dict[str, tuple[Any, float, int]] = {
        "none": (DropoutPlan(), 0.0, settings.epochs),
        "early_stop": (DropoutPlan(), 0.0, stop_at),
    }
    for arm in ("l2", "dropout", "both"):
        info = state.data["studies"][arm]
        choices[arm] = (DropoutPlan.from_yaml(info["plan"]), float(info["weight_decay"]), settings.epochs)
    for arm, (plan, wd, epochs) in choices.items():
        for seed in settings.final_seeds:
            key = f"{arm}/{seed}/{plan.digest()}/{wd:.6g}/{epochs}"
            if key not in state.data["final"]:
                run = final_run(full, plan, wd, epochs, seed, settings.limit)
                state.data["final"][key] = run
                state.save()
                progress(f"{model} final {arm} seed {seed}: test {run['test']:.4f} ({run['seconds']:.0f} s)")
    result: dict[str, Any] = {"model": model, "epochs": settings.epochs, "stop_at": stop_at, "arms": {}}
    for arm, (plan, wd, epochs) in choices.items():
        runs = [
            state.data["final"][f"{arm}/{s}/{plan.digest()}/{wd:.6g}/{epochs}"] for s in settings.final_seeds
        ]
        tests = [r["test"] for r in runs]
        gaps = [r["train_clean"] - r["test"] for r in runs]
        info = state.data["studies"].get(arm, {})
        result["arms"][arm] = {
            "test": tests,
            "gap": gaps,
            "plan": info.get("summary", "(no sites)"),
            "weight_decay": wd,
            "epochs": epochs,
            "selection_epochs": info.get(
                "epochs", len(settings.selection_seeds) * settings.epochs if arm == "early_stop" else 0
            ),
        }
    state.data["result"] = result
    state.save()
    return result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _beyond_noise(a: list[float], b: list[float]) -> bool:
    """Whether two means differ by more than twice the standard error of their difference."""
    if len(a) < 2 or len(b) < 2:
        return False
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return abs(statistics.fmean(a) - statistics.fmean(b)) > 2 * se


def conclusion(result: dict[str, Any]) -> list[str]:
    """Plain words that follow from the numbers: the best arm, and each comparison the seed asks about."""
    arms = result["arms"]
    best = max(arms, key=lambda a: statistics.fmean(arms[a]["test"]))
    lines = [f"best mean test accuracy: {ARM_TEXT[best]}."]
    for a, b in (
        ("dropout", "none"),
        ("l2", "none"),
        ("both", "none"),
        ("dropout", "l2"),
        ("dropout", "early_stop"),
        ("both", "dropout"),
        ("both", "l2"),
    ):
        da, db = statistics.fmean(arms[a]["test"]), statistics.fmean(arms[b]["test"])
        words = (
            "beyond the noise"
            if _beyond_noise(arms[a]["test"], arms[b]["test"])
            else "within the noise of 3 seeds"
        )
        lines.append(f"{ARM_TEXT[a]} vs {ARM_TEXT[b]}: {100 * (da - db):+.1f} pp ({words}).")
    return lines


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [
        "# Which regularizer? Dropout, weight decay and early stopping on MNIST-1D",
        "",
        f"Test accuracy (%) on the 1000 MNIST-1D test sequences, mean ± standard deviation over {meta['seeds']} new "
        "seeds, each "
        "arm's choice retrained on all 4000 training sequences and tested once, at the last step; the "
        "generalization gap is the training accuracy (all 4000 training sequences, eval mode: dropout off) minus "
        "the test accuracy at that step, in percentage points. Every run of every arm is "
        "as long as the model's heading says (the early-stopping arm: its chosen epoch count); the tuned arms each ran "
        f"{meta['trials']} trials of `lightning-dropout tune` with its defaults and selected on the 3600/400 split. "
        "Generated by `python benchmarks/regularizers.py` (protocol in its docstring); raw numbers in "
        "`benchmarks/results/regularizers/`.",
        "",
    ]
    for result in results:
        out += [f"## {result['model'].upper()} ({result['epochs']} epochs)", ""]
        rows = [["arm", "chosen", "test accuracy", "gap (pp)", "selection epochs"]]
        for arm in ARMS:
            info = result["arms"][arm]
            test_mean, test_std = _mean_std(info["test"])
            gap_mean, gap_std = _mean_std(info["gap"])
            chosen = {
                "none": "-",
                "early_stop": f"stop after {info['epochs']} epochs",
                "l2": f"weight_decay {info['weight_decay']:.2g}",
                "dropout": info["plan"],
                "both": f"{info['plan']}; weight_decay {info['weight_decay']:.2g}",
            }[arm]
            rows.append(
                [
                    ARM_TEXT[arm],
                    chosen,
                    f"{100 * test_mean:.1f} ± {100 * test_std:.1f}",
                    f"{100 * gap_mean:.1f} ± {100 * gap_std:.1f}",
                    str(info["selection_epochs"]),
                ]
            )
        out += [*markdown_table(rows), ""]
        out += [*(f"- {line}" for line in conclusion(result)), ""]
    out += [
        "## Protocol and noise",
        "",
        "- Noise: the seed-to-seed spread of one configuration is about 1-2 pp on these models; a difference is "
        "called beyond the noise when it exceeds twice the standard error of the difference of the two means "
        "(3 seeds each). With 3 seeds, differences below about 1.5 pp cannot be told apart.",
        "- Weight decay is Adam's `weight_decay` (an L2 penalty added to the gradient), searched log-uniformly in "
        "[1e-6, 1e-1] by a `search:` entry; the L2 study fixes dropout at 0.",
        "- Early stopping picks the epoch count with the best mean validation accuracy over 3 unregularized "
        "selection runs, then retrains on all 4000 for that many epochs (the test set is never used to stop).",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores, one thread per process, shared with other work; "
        f"{meta['date']}; versions: {meta['versions']}.",
        "",
    ]
    return "\n".join(out)


def _meta(settings: Settings) -> dict[str, Any]:
    import lightning
    import optuna
    import torch

    return {
        "epochs": settings.epochs,
        "trials": settings.trials,
        "seeds": len(settings.final_seeds),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, lightning "
        f"{lightning.__version__}, optuna {optuna.__version__}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_MD)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny runs, numbers mean nothing")
    parser.add_argument(
        "--epochs",
        default=None,
        help=f"epochs of every run, one number or per model (mlp=150,cnn=60); default {EPOCHS}",
    )
    args = parser.parse_args(argv)
    os.environ.update(THREAD_ENV)
    import torch

    torch.set_num_threads(1)
    models = [m for m in args.models.split(",") if m]
    per_model: dict[str, int] = {}
    if args.epochs:
        for item in str(args.epochs).split(","):
            name, _, value = item.rpartition("=")
            for model in [name] if name else models:
                per_model[model] = int(value)
    work: Path = args.work_dir
    results = []
    with tempfile.TemporaryDirectory(prefix="ld-regularizers-") as tmp_name:
        tmp = Path(tmp_name)
        from outcome import prepare_data

        if not args.report_only:
            prepare_data(tmp / "data")
        for model in models:
            settings = Settings(args.quick, per_model.get(model))
            if args.report_only:  # every length measured for the model, shortest first
                found = [json.loads(path.read_text()) for path in sorted(work.glob(f"{model}*.json"))]
                runs = [data["result"] for data in found if "result" in data]
                results += sorted(runs, key=lambda result: result["epochs"])
                continue
            results.append(run_model(model, settings, work, tmp))
    if results:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(results, _meta(Settings(args.quick))))
        progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
