"""Which trial value ranks dropout configurations best? (issue 9, part 2: the default ``study.value``)

A trial's value is a summary of one noisy validation curve (one seed, 400 validation sequences). This script
measures, for several summaries ("estimators"), how well they rank configurations by what a user cares about:
the mean test accuracy of the configuration retrained on fresh seeds.

For each model (the MNIST-1D paper's MLP and CNN, ``benchmarks/configs/outcome_<model>.yaml``):

1. Configurations: no dropout, the uniform grid of the obvious variant (p = 0.1 ... 0.5), and random plans drawn
   from the tuner's own search space (Optuna ``RandomSampler`` through ``suggest_plan``, fixed seed).
2. Selection run: each configuration trained once with the selection seed on the 3600/400 split at the paper's
   length (150 epochs of batch 100), recording ``val_acc`` and ``val_loss`` after every epoch.
3. Fresh runs: each configuration retrained on all 4000 training sequences for the same number of steps (6000),
   with 2 new seeds, tested once at the last step (the paper's protocol). Their mean is the target.
4. Each estimator is computed from the selection curve (the same formulas as
   ``lightning_dropout.tune.value``) and its Spearman rank correlation with the target is reported, with a
   bootstrap interval over configurations and how often each estimator ranks best across bootstrap samples.

Every training run is saved as soon as it ends (``benchmarks/results/estimators_<model>.json``); running the
script again resumes. ``--report-only`` rewrites ``benchmarks/results/estimators.md`` from the JSON files.

Usage::

    python benchmarks/estimators.py --models mlp          # one model per process (run two side by side)
    python benchmarks/estimators.py --report-only
    python benchmarks/estimators.py --quick --out-dir /tmp/est   # smoke test, numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import quiet
from outcome import FULL, curve_callback, make_tuner, prepare_data, trainer_kwargs

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CONFIG_DIR = REPO / "benchmarks" / "configs"
MODELS = ("mlp", "cnn")
GRID_RULES: dict[str, dict[str, Any]] = {
    "mlp": {"match": "Linear", "variant": "standard"},
    "cnn": {"match": "Conv1d", "variant": "spatial"},
}
GRID = (0.1, 0.2, 0.3, 0.4, 0.5)
SELECTION_SEED = 0
FRESH_SEEDS = (1, 2)


def progress(msg: str) -> None:
    sys.stderr.write(f"[estimators {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def train(tuner: Any, plan: Any, seed: int, epochs: int, limit: int | None, test: bool) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_dropout.callback import DropoutInjector

    start = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    curves = curve_callback("val_acc", "val_loss")
    callbacks = [curves] + ([DropoutInjector(plan=plan, dropout_seed=seed)] if len(plan) else [])
    cli = tuner.cli.fresh(callbacks, **trainer_kwargs(limit), max_epochs=epochs)
    with quiet():
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        out: dict[str, Any] = {
            "seed": seed,
            "acc": curves.curves["val_acc"],
            "loss": curves.curves["val_loss"],
        }
        if test:
            result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
            out["test"] = float(result[0]["test_acc"])
    out["seconds"] = time.perf_counter() - start
    return out


def configurations(name: str, tuner: Any, n_random: int) -> list[tuple[str, Any]]:
    """(label, plan): no dropout, the uniform grid, then random plans from the tuner's search space."""
    import optuna

    from lightning_dropout import DropoutPlan, Rule
    from lightning_dropout.injection import resolve
    from lightning_dropout.tune.space import suggest_plan

    model = tuner.cli.fresh().model
    example = getattr(model, "example_input_array", None)
    out: list[tuple[str, Any]] = [("no dropout", DropoutPlan())]
    out += [(f"uniform p={p:g}", resolve(model, [Rule(**GRID_RULES[name], p=p)], example)) for p in GRID]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=12345))
    for i in range(n_random):
        trial = study.ask()
        out.append((f"random {i}", suggest_plan(trial, tuner.space.groups, model, example)))
        study.tell(trial, 0.0)
    return out


def run_model(name: str, n_random: int, epochs: int, limit: int | None, path: Path, tmp: Path) -> None:
    from lightning_dropout.tune.study import plan_summary

    prepare_data(tmp / "data")
    data = (
        json.loads(path.read_text()) if path.is_file() else {"model": name, "epochs": epochs, "configs": {}}
    )
    base = ["--trainer.max_epochs", str(epochs)]
    select = make_tuner(name, FULL, tmp, CONFIG_DIR, tuple(base))
    full = make_tuner(name, FULL, tmp, CONFIG_DIR, (*base, "--data.init_args.val_fraction=0"))
    for label, plan in configurations(name, select, n_random):
        entry = data["configs"].setdefault(label, {"plan": plan_summary(plan), "digest": plan.digest()})
        if entry["digest"] != plan.digest():
            raise SystemExit(f"{path}: the plan of {label!r} changed; delete the file to start over")
        if "selection" not in entry:
            entry["selection"] = train(select, plan, SELECTION_SEED, epochs, limit, test=False)
            path.write_text(json.dumps(data, indent=1))
            run = entry["selection"]
            progress(f"{name} {label}: selection best val {max(run['acc']):.4f} ({run['seconds']:.0f} s)")
        fresh = entry.setdefault("fresh", {})
        for seed in FRESH_SEEDS:
            if str(seed) not in fresh:
                fresh[str(seed)] = train(full, plan, seed, epochs, limit, test=True)
                path.write_text(json.dumps(data, indent=1))
                progress(f"{name} {label}: seed {seed} test {fresh[str(seed)]['test']:.4f}")


# ----------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------
def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan


def estimator_values(entry: dict[str, Any]) -> dict[str, float]:
    from lightning_dropout.tune.value import ESTIMATORS, trial_value

    run = entry["selection"]
    out = {f"val_acc {e}": trial_value(run["acc"], e, maximize=True) for e in ESTIMATORS}
    # val_loss is minimized: negate so that every column is "higher is better"
    out.update({f"val_loss {e}": -trial_value(run["loss"], e, maximize=False) for e in ESTIMATORS})
    return out


def analyse(data: dict[str, Any], boot: int = 2000) -> dict[str, Any]:
    done = [
        e
        for e in data["configs"].values()
        if "selection" in e and len(e.get("fresh", {})) == len(FRESH_SEEDS)
    ]
    if len(done) < 3:
        return {"n": len(done)}
    target = [statistics.fmean(r["test"] for r in e["fresh"].values()) for e in done]
    values = [estimator_values(e) for e in done]
    names = list(values[0])
    rho = {n: spearman([v[n] for v in values], target) for n in names}
    rng = random.Random(0)
    samples: dict[str, list[float]] = {n: [] for n in names}
    wins = dict.fromkeys(names, 0)
    for _ in range(boot):
        idx = [rng.randrange(len(done)) for _ in done]
        t = [target[i] for i in idx]
        r = {n: spearman([values[i][n] for i in idx], t) for n in names}
        for n in names:
            samples[n].append(r[n])
        finite = {n: x for n, x in r.items() if not math.isnan(x)}
        if finite:
            wins[max(finite, key=lambda n: finite[n])] += 1
    interval = {}
    for n in names:
        s = sorted(x for x in samples[n] if not math.isnan(x))
        interval[n] = (s[int(0.05 * len(s))], s[int(0.95 * len(s)) - 1]) if s else (math.nan, math.nan)
    return {
        "n": len(done),
        "rho": rho,
        "interval": interval,
        "wins": {n: wins[n] / boot for n in names},
        "target_range": (min(target), max(target)),
    }


def report(paths: list[Path], md: Path) -> str:
    lines = [
        "# Trial-value estimators: which one ranks dropout configurations best",
        "",
        "Generated by `python benchmarks/estimators.py` (see its docstring for the protocol). Spearman rank "
        "correlation between each estimator, computed on one selection run (seed 0, 3600 train / 400 "
        f"validation), and the mean test accuracy of the same configuration retrained on all 4000 training "
        f"sequences with {len(FRESH_SEEDS)} new seeds (tested at the last step). 90 % bootstrap interval over "
        "configurations; 'best in' is the share of bootstrap samples in which the estimator has the highest "
        "correlation.",
        "",
    ]
    for path in paths:
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        result = analyse(data)
        n_total = len(data["configs"])
        lines += [
            f"## {data['model'].upper()} ({data['epochs']} epochs; {result['n']} configurations done)",
            "",
        ]
        if "rho" not in result:
            lines += ["Not enough finished configurations yet.", ""]
            continue
        lo, hi = result["target_range"]
        lines += [
            f"Mean fresh-seed test accuracy ranges from {100 * lo:.1f} % to {100 * hi:.1f} % over the "
            f"configurations ({result['n']} of {n_total} finished).",
            "",
            "| estimator | Spearman rho | 90 % interval | best in |",
            "|---|---:|---:|---:|",
        ]
        for name, rho in sorted(result["rho"].items(), key=lambda kv: -kv[1] if not math.isnan(kv[1]) else 9):
            a, b = result["interval"][name]
            lines.append(f"| {name} | {rho:.3f} | {a:.2f} to {b:.2f} | {100 * result['wins'][name]:.0f} % |")
        lines.append("")
    text = "\n".join(lines)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--random", type=int, default=18, help="random configurations per model")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 2 epochs, 2 random plans, 2 batches"
    )
    ns = parser.parse_args(argv)
    models = [m for m in ns.models.split(",") if m]
    paths = [ns.out_dir / f"estimators_{m}.json" for m in MODELS]
    if not ns.report_only:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
        epochs, n_random, limit = (2, 2, 2) if ns.quick else (ns.epochs, ns.random, None)
        ns.out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ld-estimators-") as tmp:
            for m in models:
                run_model(m, n_random, epochs, limit, ns.out_dir / f"estimators_{m}.json", Path(tmp))
    sys.stdout.write(report(paths, ns.out_dir / "estimators.md") + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
