"""End-to-end overhead: ``Trainer.fit`` epoch time of the zoo models with injected dropout, at the configs' batch size.

For each zoo model (MLP, CNN, GRU, Transformer; MNIST-1D, ``batch_size=100`` as in ``configs/``) four arms
train the same number of epochs on the same data, one after the other in each repeat (the order rotating
between repeats, so all arms see the same machine load):

* ``plain``: a plain PyTorch loop (train + validation pass, Adam) over the same loaders, the model written by
  hand with ``nn.Dropout``: the physical floor;
* ``hand``: ``Trainer.fit`` of that hand-written model (TensorBoard logger, ``log_every_n_steps=10``);
* ``injected``: ``Trainer.fit`` of the zoo model (no dropout of its own) with ``DropoutInjector(rules=...)`` at
  its default settings, giving the same sites (checked: same plan keys, same outputs from the same seed);
* ``trial``: what a tuning trial runs (``Tuner.train``): the same plan through ``DropoutInjector(plan,
  dropout_seed=1234)``, a ``GapMonitor`` on 256 training examples, ``TrialPruning`` and the per-trial
  ``TrialLogger`` (its HParams record is written after the timed epochs, as in a study).

An epoch's time runs from one ``on_train_epoch_start`` to the next (training, validation, the epoch-end hooks
and monitors); the first epoch of each run is dropped (warm-up). Per repeat and model the ratios
``injected / hand`` (target <= 1.02x), ``trial / injected`` (target <= 1.10x) and ``hand / plain`` (what
Lightning itself costs) are taken; the report gives their median and interquartile range over the repeats.

Usage::

    python benchmarks/e2e_overhead.py                           # 7 repeats x 4 epochs -> results/e2e_overhead.md
    python benchmarks/e2e_overhead.py --models mlp --profile trial   # cProfile of one arm, top functions
    python benchmarks/e2e_overhead.py --quick --out /tmp/e2e.md      # smoke test (tiny data, seconds)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process, before torch is imported

import argparse
import cProfile
import datetime
import gc
import io
import math
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from common import cpu_model, markdown_table, quiet
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

import lightning_dropout
from lightning_dropout import Rule, resolve
from lightning_dropout.callback import DropoutInjector
from lightning_dropout.data import MNIST1DDataModule
from lightning_dropout.monitor import GapMonitor
from lightning_dropout.tune.board import TrialLogger
from lightning_dropout.tune.pruning import TrialPruning
from lightning_dropout.zoo import CNN, GRU, MLP, TransformerEncoderClassifier

P = 0.1
BATCH_SIZE = 100  # configs/mnist1d_*.yaml
LOG_EVERY = 10  # configs/mnist1d_mlp.yaml
TARGET_INJECTED = 1.02
TARGET_TRIAL = 1.10
ARMS = ("plain", "hand", "injected", "trial")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "e2e_overhead.md"


# ----------------------------------------------------------------------------------------------------------
# The zoo models written by hand with nn.Dropout where the rules put it
# ----------------------------------------------------------------------------------------------------------
class HandMLP(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.drop1, self.drop2 = nn.Dropout(P), nn.Dropout(P)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop1(self.linear1(x)).relu()
        h = h + self.drop2(self.linear2(h)).relu()
        return self.linear3(h)


class HandCNN(CNN):
    def __init__(self) -> None:
        super().__init__()
        self.drops = nn.ModuleList(nn.Dropout(P) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        h = x.unsqueeze(1)
        for conv, drop in zip((self.conv1, self.conv2, self.conv3), self.drops, strict=True):
            h = drop(conv(h)).relu()
        return self.head(h.flatten(1))


class HandGRU(GRU):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(P)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.head(self.drop(out).flatten(1))


class HandTransformer(TransformerEncoderClassifier):
    """The encoder layers' own dropout at ``P`` (their three ``nn.Dropout`` and the attention dropout)."""

    def __init__(self) -> None:
        super().__init__()
        for layer in self.encoder.layers:
            layer.dropout.p = layer.dropout1.p = layer.dropout2.p = P
            layer.self_attn.dropout = P


@dataclass
class Case:
    name: str
    zoo: Callable[[], L.LightningModule]
    hand: Callable[[], L.LightningModule]
    rules: list[Rule]
    sites: list[str]  # the plan's keys, checked


CASES = [
    Case("mlp", MLP, HandMLP, [Rule(match=nn.Linear, p=P)], ["linear1:output", "linear2:output"]),
    Case("cnn", CNN, HandCNN, [Rule(match=nn.Conv1d, p=P)], ["conv1:output", "conv2:output", "conv3:output"]),
    Case("gru", GRU, HandGRU, [Rule(match=nn.GRU, variant="standard", p=P)], ["gru:output"]),
    Case(
        "transformer",
        TransformerEncoderClassifier,
        HandTransformer,
        [Rule(replace=True, p=P), Rule(match=nn.TransformerEncoderLayer, variant="attention", p=P)],
        [
            f"encoder.layers.{i}.{name}"
            for i in range(2)
            for name in ("self_attn:attribute", "dropout:replace", "dropout1:replace", "dropout2:replace")
        ],
    ),
]


def check_case(case: Case) -> None:
    """The injected zoo model has the hand-written sites and computes the same function (same seed)."""
    torch.manual_seed(0)
    hand = case.hand()
    zoo = case.zoo()
    zoo.load_state_dict(hand.state_dict())
    plan = lightning_dropout.inject(zoo, rules=case.rules, example_input=zoo.example_input_array)
    if sorted(s.key for s in plan) != sorted(case.sites):
        raise RuntimeError(
            f"{case.name}: the rules give sites {[s.key for s in plan]}, expected {case.sites}"
        )
    x = torch.randn(8, 40)
    for training in (False, True):
        outs = []
        for model in (hand, zoo):
            model.train(training)
            torch.manual_seed(1234)
            with torch.no_grad():
                outs.append(model(x))
        if not torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6):
            mode = "train" if training else "eval"
            raise RuntimeError(
                f"{case.name}: {mode} outputs of the hand-written and the injected model differ"
            )


# ----------------------------------------------------------------------------------------------------------
# The arms
# ----------------------------------------------------------------------------------------------------------
class EpochTimer(L.Callback):
    """Wall time of each epoch: from one ``on_train_epoch_start`` to the next (or ``on_train_end``)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks.append(time.perf_counter())

    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def data(args: argparse.Namespace) -> MNIST1DDataModule:
    dm = MNIST1DDataModule(
        batch_size=BATCH_SIZE, val_fraction=0.1, cache_dir=str(args.cache_dir), num_samples=args.num_samples
    )
    dm.prepare_data()
    return dm


def plain_loop(case: Case, args: argparse.Namespace) -> list[float]:
    """Train + validation passes of the hand-written model in plain PyTorch: the floor."""
    dm = data(args)
    dm.setup("fit")
    model = case.hand()
    opt = model.configure_optimizers()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((model(x).argmax(-1) == y).sum())
        times.append(time.perf_counter() - start)
    return times


def fit(case: Case, arm: str, args: argparse.Namespace, logdir: Path, run: str) -> list[float]:
    timer = EpochTimer()
    callbacks: list[L.Callback] = []
    logger: TensorBoardLogger
    if arm == "hand":
        model = case.hand()
        logger = TensorBoardLogger(logdir, name=arm, version=run)
    else:
        model = case.zoo()
        if arm == "injected":
            callbacks.append(DropoutInjector(rules=case.rules))
            logger = TensorBoardLogger(logdir, name=arm, version=run)
        else:  # what Tuner.train adds around a trial
            plan = resolve(model, case.rules, model.example_input_array)
            callbacks += [
                DropoutInjector(plan=plan, dropout_seed=1234),
                GapMonitor(256, seed=0),
                TrialPruning(None, "val_acc", "maximize"),
            ]
            logger = TrialLogger(logdir, name="trials", version=run)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=[*callbacks, timer],
        logger=logger,
        log_every_n_steps=LOG_EVERY,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data(args))
    if isinstance(logger, TrialLogger):
        logger.finish(
            {"trial": 0, "state": "complete"}, {"hp/value": float(trainer.callback_metrics["val_acc"])}
        )
    return timer.epochs()


def run_arm(case: Case, arm: str, args: argparse.Namespace, logdir: Path, run: str) -> float:
    """Mean seconds per epoch after the first (warm-up) epoch."""
    gc.collect()
    torch.manual_seed(0)
    epochs = plain_loop(case, args) if arm == "plain" else fit(case, arm, args, logdir, run)
    kept = epochs[1:] or epochs
    return sum(kept) / len(kept)


# ----------------------------------------------------------------------------------------------------------
# Measuring and reporting
# ----------------------------------------------------------------------------------------------------------
def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


RATIOS = {
    "injected / hand": ("injected", "hand"),
    "trial / injected": ("trial", "injected"),
    "hand / plain": ("hand", "plain"),
}
TARGETS = {"injected / hand": TARGET_INJECTED, "trial / injected": TARGET_TRIAL}


def measure(case: Case, args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    check_case(case)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(args.repeats):
        order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]  # rotate who goes first
        for arm in order:
            times[arm].append(run_arm(case, arm, args, logdir, f"{case.name}_{r}"))
    ratios = {
        label: [a / b for a, b in zip(times[num], times[den], strict=True)]
        for label, (num, den) in RATIOS.items()
    }
    return {"times": times, "ratios": ratios}


def profile(case: Case, arm: str, args: argparse.Namespace, logdir: Path, top: int = 45) -> str:
    run_arm(case, arm, args, logdir, "warm")  # lazy imports and first-call costs out of the profile
    prof = cProfile.Profile()
    prof.enable()
    run_arm(case, arm, args, logdir, "profiled")
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def table(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    head = ["model", *(f"{arm} ms/epoch" for arm in ARMS)]
    for label in RATIOS:
        head.append(f"{label} (IQR)")
    rows = [head]
    for name, res in results.items():
        row = [name, *(f"{1e3 * statistics.median(res['times'][arm]):.1f}" for arm in ARMS)]
        for label in RATIOS:
            q1, med, q3 = quartiles(res["ratios"][label])
            mark = ""
            if label in TARGETS:
                mark = " ok" if med <= TARGETS[label] else " OVER"
            row.append(f"{med:.3f}x ({q1:.3f}-{q3:.3f}){mark}")
        rows.append(row)
    return rows


def format_markdown(rows: list[list[str]], meta: dict[str, str]) -> str:
    lines = [
        "# End-to-end overhead: Trainer.fit epoch time",
        "",
        "Generated by `python benchmarks/e2e_overhead.py` (see `benchmarks/README.md`). ms/epoch: median over "
        "the repeats of each run's mean epoch time (first epoch dropped). Ratios per repeat, median and "
        f"interquartile range. Targets: injected / hand <= {TARGET_INJECTED}x, trial / injected <= "
        f"{TARGET_TRIAL}x; `plain` (a plain PyTorch loop) is the floor.",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", *markdown_table(rows)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="repeats per model, each running every arm")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not counted")
    parser.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D samples (the configs' 5000)")
    parser.add_argument("--models", default=",".join(c.name for c in CASES))
    parser.add_argument("--profile", choices=ARMS, default=None, help="cProfile one run of this arm instead")
    parser.add_argument("--cache-dir", type=Path, default=None, help="MNIST-1D cache (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, 2 epochs, 500 samples")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.num_samples = 1, 2, 500
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown or not names:
        parser.error(f"--models must name some of {[c.name for c in CASES]}, got {args.models!r}")
    args.models = names
    if args.repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)
    cases = [c for c in CASES if c.name in args.models]
    with tempfile.TemporaryDirectory() as tmp, quiet():
        logdir = Path(tmp) / "logs"
        if args.cache_dir is None:
            args.cache_dir = Path(tmp) / "mnist1d"
        if args.profile:
            for case in cases:
                print(f"== {case.name} / {args.profile}\n{profile(case, args.profile, args, logdir)}")
            return 0
        results = {}
        for case in cases:
            results[case.name] = res = measure(case, args, logdir)
            meds = {arm: 1e3 * statistics.median(v) for arm, v in res["times"].items()}
            print(
                f"{case.name}: "
                + ", ".join(f"{arm} {ms:.1f} ms" for arm, ms in meds.items())
                + "; "
                + ", ".join(f"{k} {statistics.median(v):.3f}x" for k, v in res["ratios"].items()),
                flush=True,
            )
    steps = math.ceil(args.num_samples * 0.8 * 0.9 / BATCH_SIZE)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "lightning_dropout": lightning_dropout.__version__,
        "python": platform.python_version(),
        "CPU": cpu_model(),
        "threads": str(torch.get_num_threads()),
        "load average (1 min) before/after": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
        "runs": f"{args.repeats} repeats x {args.epochs} epochs of ~{steps} steps (batch {BATCH_SIZE})"
        + (" [--quick]" if args.quick else ""),
    }
    rows = table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_markdown(rows, meta))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
