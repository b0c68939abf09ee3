"""Cost of :class:`~lightning_dropout.monitor.GapMonitor` per epoch, as a fraction of the epoch time.

The MNIST-1D example models (:mod:`lightning_dropout.zoo` MLP, CNN, GRU) are fitted on
``MNIST1DDataModule(batch_size=100)`` (3600 training sequences: 36 steps per epoch, 400 validation sequences)
with ``torch.set_num_threads(1)`` and ``GapMonitor()`` at its defaults (``num_samples=256``,
``train_mode=True``: two extra passes over 256 training examples per validation). To pair the measurements
as closely as a shared machine allows, one fit runs the monitor after every other validation only (epochs
1, 3, 5, ... in even repeats, 2, 4, 6, ... in odd ones); epoch 0 is a warm-up (it also pays the one-off
creation of the subset loader). Two figures per model:

- **own**: the monitor's measured time (``timing/gap_seconds``, the whole ``on_validation_end``) divided by the time
  of the same epoch (training steps + validation + monitor);
- **end to end**: time of an epoch with the monitor / time of the adjacent epoch without it, minus 1.

Both are summarized by the median (and IQR) over all pairs. Target: <= 5 %. The breakdown section splits one
monitor call into its parts (the ``untouched`` context with its deep copies of metric states and
``fork_rng``, the module's ``validation_step``, the clean pass, the dropout pass) and times the same call with
the first version's settings (batches of 100 from the training loader, the subset re-read every pass) for
comparison.

Usage::

    nice -n 5 python benchmarks/monitor.py                      # -> benchmarks/results/monitor.md
    python benchmarks/monitor.py --quick --out /tmp/monitor.md  # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from common import cpu_model
from lightning.pytorch.callbacks import Callback

import lightning_dropout
from lightning_dropout.data import MNIST1DDataModule
from lightning_dropout.monitor import GapMonitor, LogCapture
from lightning_dropout.passes import untouched
from lightning_dropout.zoo import CNN, GRU, MLP

TARGET = 0.05
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "monitor.md"
MODELS = {"mlp": MLP, "cnn": CNN, "gru": GRU}


class EpochTimer(Callback):
    """Wall time of each training epoch, validation and any on_validation_end work included (Lightning runs
    the end-of-epoch validation before ``on_train_epoch_end``)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._start)


class Breakdown(Callback):
    """At the last validation, time the parts of one GapMonitor call (placed after the monitor)."""

    def __init__(self, monitor: GapMonitor, reps: int) -> None:
        self.monitor, self.reps = monitor, reps
        self.parts: dict[str, float] = {}

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.current_epoch != trainer.max_epochs - 1:
            return
        mon = self.monitor

        def timed(fn) -> float:
            """Fastest of ``reps`` runs: on a shared machine the minimum is the least disturbed timing."""
            samples = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            return min(samples)

        def untouched_only():
            with untouched(pl_module):
                pass

        def fork_only():
            with torch.random.fork_rng(devices=[]):
                pass

        def build_batches():
            mon._batches = None
            mon._subset_batches(trainer)

        batches = [trainer.strategy.batch_to_device(b) for b in mon._subset_batches(trainer)]

        def iterate_loader(batch_size: int):
            def run():
                saved = mon.batch_size
                mon.batch_size = batch_size
                try:
                    for _ in mon._subset_loader(trainer):
                        pass
                finally:
                    mon.batch_size = saved

            return run

        def to_device():
            for batch in batches:
                trainer.strategy.batch_to_device(batch)

        def forward_only():
            pl_module.eval()
            for x, _ in batches:
                pl_module(x)

        def forward_loss_metric():
            pl_module.eval()
            for x, y in batches:
                logits = pl_module(x)
                torch.nn.functional.cross_entropy(logits, y)
                pl_module.val_acc(logits, y)  # the zoo modules' own torchmetrics accuracy (forward)

        def steps_captured():
            """The monitor's inner loop on the kept batches: validation_step with `log` captured."""
            capture = LogCapture()
            pl_module.log = capture
            try:
                pl_module.eval()
                for i, batch in enumerate(batches):
                    capture.batch = batch
                    pl_module.validation_step(batch, i)
            finally:
                del pl_module.log

        def one_call():
            with untouched(pl_module):
                mon._evaluate(trainer, pl_module, dropout_on=False)
                mon._evaluate(trainer, pl_module, dropout_on=True)

        def clean():
            with untouched(pl_module):
                mon._evaluate(trainer, pl_module, dropout_on=False)

        def noisy():
            with untouched(pl_module):
                mon._evaluate(trainer, pl_module, dropout_on=True)

        def variant(batch_size: int | None, keep: bool):
            """One call with another batch size and/or the subset re-read (indexing + collation) on every
            pass, as the first version of the monitor did (batch size of the training loader, loader kept
            but iterated each pass)."""
            saved = (mon.batch_size, mon._batches, mon._subset_batches)
            mon.batch_size, mon._batches = batch_size, None
            if not keep:
                mon._subset_batches = lambda trainer: mon._subset_loader(trainer)  # type: ignore[method-assign]
            try:
                return timed(one_call)
            finally:
                mon.batch_size, mon._batches = saved[0], saved[1]
                if not keep:
                    del mon._subset_batches

        with torch.no_grad(), untouched(pl_module):
            default_bs = len(batches[0][0])
            self.parts = {
                f"subset batches built (once per fit; {len(batches)} of {default_bs})": timed(build_batches),
                "_untouched enter+exit (deepcopy of metric states, fork_rng, flags)": timed(untouched_only),
                "&nbsp;&nbsp;of which fork_rng": timed(fork_only),
                "per pass: batch_to_device (Lightning transfer hooks)": timed(to_device),
                "per pass: validation_step with `log` captured": timed(steps_captured),
                "&nbsp;&nbsp;of which model forward": timed(forward_only),
                "&nbsp;&nbsp;of which forward + loss + `val_acc(logits, y)` (torchmetrics forward)": timed(
                    forward_loss_metric
                ),
                "clean pass (_untouched + _evaluate dropout off)": timed(clean),
                "dropout pass (_untouched + _evaluate dropout on)": timed(noisy),
                "one call as shipped (both passes, batches kept, the validation loader's batch size)": timed(
                    one_call
                ),
                "re-reading the subset per pass would add (Subset indexing + default_collate, batch 100)": timed(
                    iterate_loader(100)
                ),
                "one call, batches kept, batch size 256 (one batch)": variant(256, keep=True),
                "one call, subset re-read every pass, batch 100 (first version)": variant(100, keep=False),
            }


class EveryOther(GapMonitor):
    """GapMonitor() that runs after the validations of epochs with ``epoch % 2 == parity`` only."""

    def __init__(self, parity: int) -> None:
        super().__init__()
        self.parity = parity

    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch % 2 == self.parity:
            super().on_validation_end(trainer, pl_module)


def fit(model_cls, dm: MNIST1DDataModule, epochs: int, parity: int, seed: int, breakdown: int = 0):
    """Epoch times, the monitor's history and (when ``breakdown``) the timed parts of one call."""
    L.seed_everything(seed, verbose=False)
    timer, gap = EpochTimer(), EveryOther(parity)
    callbacks: list[Callback] = [gap, timer]
    extra = Breakdown(gap, breakdown) if breakdown else None
    if extra is not None:
        callbacks.insert(1, extra)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    gc.collect()
    trainer.fit(model_cls(), datamodule=dm)
    return timer.times, gap.history, (extra.parts if extra is not None else {})


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def measure(name: str, dm: MNIST1DDataModule, repeats: int, epochs: int, seed: int) -> dict:
    base_epoch, mon_epoch, mon_seconds, own, overhead = [], [], [], [], []
    for r in range(repeats):
        parity = 1 if r % 2 == 0 else 0  # who comes first within a pair alternates between repeats
        times, history, _ = fit(MODELS[name], dm, epochs, parity, seed)
        seconds = {int(h["epoch"]): h["timing/gap_seconds"] for h in history}
        for first in range(1, epochs - 1, 2):  # pairs (1, 2), (3, 4), ...; epoch 0 is the warm-up
            on = first if first in seconds else first + 1
            off = first + 1 if on == first else first
            base_epoch.append(times[off])
            mon_epoch.append(times[on])
            mon_seconds.append(seconds[on])
            own.append(seconds[on] / times[on])
            overhead.append(times[on] / times[off] - 1)
        print(
            f"  {name} repeat {r}: epoch {statistics.median(base_epoch[-(epochs // 2) :]) * 1e3:.0f} ms "
            f"without, monitor {statistics.median(mon_seconds[-(epochs // 2) :]) * 1e3:.1f} ms; own "
            f"{statistics.median(own[-(epochs // 2) :]):.2%}, end to end "
            f"{statistics.median(overhead[-(epochs // 2) :]):+.2%}",
            flush=True,
        )
    return {
        "name": name,
        "pairs": len(own),
        "base_ms": 1e3 * statistics.median(base_epoch),
        "mon_ms": 1e3 * statistics.median(mon_epoch),
        "seconds_ms": 1e3 * statistics.median(mon_seconds),
        "own": quartiles(own),
        "e2e": quartiles(overhead),
        # the least disturbed timings: on a shared machine the best estimate of the idle-machine cost
        "fast_base_ms": 1e3 * min(base_epoch),
        "fast_seconds_ms": 1e3 * min(mon_seconds),
        "fast_own": min(mon_seconds) / min(base_epoch),
    }


def pct(q: tuple[float, float, float]) -> str:
    return f"{q[1]:.2%}"


def iqr(q: tuple[float, float, float]) -> str:
    return f"{q[0]:.2%} to {q[2]:.2%}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fits per model (default 3)")
    parser.add_argument(
        "--epochs", type=int, default=9, help="epochs per fit: a warm-up, then pairs (default 9)"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", type=int, default=20, help="repetitions of each timed part (0: no breakdown)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 repeat of 2 epochs, MLP only")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.models, args.profile = 1, 3, "mlp", 3
    if args.repeats < 1 or args.epochs < 3 or args.epochs % 2 == 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --epochs odd and >= 3")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or set(args.models) - set(MODELS):
        parser.error(f"--models must name some of {list(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    dm = MNIST1DDataModule(batch_size=100)
    dm.prepare_data()
    dm.setup("fit")
    results = []
    for name in args.models:
        results.append(measure(name, dm, args.repeats, args.epochs, args.seed))
    breakdowns = {}
    if args.profile:
        for name in args.models:
            _, _, parts = fit(MODELS[name], dm, 2, 1, args.seed, breakdown=args.profile)
            breakdowns[name] = parts
    load_after = os.getloadavg()[0]

    n_train, n_val = len(dm.train_dataset), len(dm.val_dataset)
    default = GapMonitor()
    lines = [
        "# GapMonitor: cost per epoch",
        "",
        "Generated by `python benchmarks/monitor.py` (see `benchmarks/README.md`). MNIST-1D, "
        f"`MNIST1DDataModule(batch_size=100)`: {n_train} training sequences ({n_train // 100} steps per epoch), "
        f"{n_val} validation sequences; `{default!r}` (the defaults: two passes over 256 training examples per "
        "validation, in batches of the validation loader's size (100), collated once per "
        f"fit and kept). Per model, {args.repeats} fits of "
        f"{args.epochs} epochs that run the monitor after every other validation (epoch 0 a warm-up), "
        "giving adjacent pairs of epochs with and without it. *own* = `timing/gap_seconds` / time of the same "
        "epoch; *end to end* = epoch time with / adjacent epoch time without - 1; medians and IQR over the "
        f"{args.repeats * (args.epochs // 2)} pairs. Target: <= {TARGET:.0%}.",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, lightning {L.__version__}, lightning_dropout {lightning_dropout.__version__}, "
        f"python {platform.python_version()}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} cores), threads: {torch.get_num_threads()}",
        f"- 1-min load average: {load_before:.2f} before, {load_after:.2f} after"
        + (" (shared machine: figures inflated and noisy)" if max(load_before, load_after) > 1.0 else ""),
        "",
        "| model | epoch ms (without) | epoch ms (with) | monitor ms / validation | own (median) | own IQR "
        f"| end to end (median) | end to end IQR | own <= {TARGET:.0%} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    fastest = [
        "",
        "The same from the fastest timings (fastest epoch without the monitor, fastest monitor call): on a "
        "shared machine the least disturbed ones, the best estimate of the cost on an idle machine (an "
        "end-to-end figure from minima would compare two extremes and is left out).",
        "",
        f"| model | fastest epoch ms (without) | fastest monitor ms | own | own <= {TARGET:.0%} |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        fastest.append(
            f"| {r['name']} | {r['fast_base_ms']:.0f} | {r['fast_seconds_ms']:.1f} | {r['fast_own']:.2%} | "
            f"{'yes' if r['fast_own'] <= TARGET else 'NO'} |"
        )
    for r in results:
        lines.append(
            f"| {r['name']} | {r['base_ms']:.0f} | {r['mon_ms']:.0f} | {r['seconds_ms']:.1f} | {pct(r['own'])} | "
            f"{iqr(r['own'])} | {pct(r['e2e'])} | {iqr(r['e2e'])} | {'yes' if r['own'][1] <= TARGET else 'NO'} |"
        )
    lines += fastest
    if breakdowns:
        names = list(breakdowns)
        parts = list(next(iter(breakdowns.values())))
        lines += [
            "",
            f"Breakdown of one monitor call at the last validation (fastest of {args.profile} timings, ms):",
            "",
            "| part | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for part in parts:
            lines.append(
                f"| {part} | " + " | ".join(f"{breakdowns[n][part] * 1e3:.2f}" for n in names) + " |"
            )
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
