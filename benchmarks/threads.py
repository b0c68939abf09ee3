"""The quickstart study with one competing CPU-bound process against the same study on a quiet machine.

Runs ``lightning-dropout tune configs/quickstart.yaml`` (each run a fresh ``python -m lightning_dropout.cli``
process with its own run directory and study name, one shared MNIST-1D cache) once on the quiet machine and
once while a competitor (``python -c "while True: pass"``, one core's worth of work) runs, for each thread
setting: ``default`` (``study.threads`` unset and ``OMP_NUM_THREADS`` removed from the environment, so the
default applies) and ``--settings`` values of ``study.threads``. The quiet and busy runs of a setting follow
each other, their order alternating between settings. Reported: the wall times and the ratio busy / quiet.
Target: <= 1.3x with the default.

Usage::

    python benchmarks/threads.py                      # default and threads=2 -> benchmarks/results/threads.md
    python benchmarks/threads.py --settings default,1,2,4
    python benchmarks/threads.py --quick --out /tmp/threads.md   # smoke test: 2 trials of 2 epochs, no re-runs
    python benchmarks/threads.py -- --study.n_trials=4          # overrides passed on to `tune`
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model

TARGET = 1.3
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "threads.md"
QUICK = ["--study.n_trials=2", "--trainer.max_epochs=2", "--study.seeds=0", "--study.warm_start=false"]


def prepare_data(config: Path, cache_dir: Path) -> None:
    """Generate the config's MNIST-1D data once, before any timed run."""
    import yaml

    from lightning_dropout.data import MNIST1DDataModule

    init_args = dict((yaml.safe_load(config.read_text()).get("data") or {}).get("init_args") or {})
    MNIST1DDataModule(**{**init_args, "cache_dir": str(cache_dir)}).prepare_data()


def run_study(config: Path, setting: str, tmp: Path, label: str, overrides: list[str]) -> float:
    env = dict(os.environ)
    threads: list[str] = []
    if setting == "default":
        env.pop("OMP_NUM_THREADS", None)
        env.pop("MKL_NUM_THREADS", None)
    else:
        threads = [f"--study.threads={setting}"]
    cmd = [
        sys.executable,
        "-m",
        "lightning_dropout.cli",
        "tune",
        str(config),
        f"--study.name=threads_{label}",
        f"--study.run_dir={tmp / 'runs' / label}",
        f"--data.init_args.cache_dir={tmp / 'data'}",
        *threads,
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=tmp)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed


def timed(config: Path, setting: str, busy: bool, tmp: Path, label: str, overrides: list[str]) -> float:
    competitor = (
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    )  # one core's worth of CPU-bound work
    try:
        return run_study(config, setting, tmp, label, overrides)
    finally:
        if competitor is not None:
            competitor.terminate()
            competitor.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument(
        "--settings", default="default,2", help="comma-separated: default and/or study.threads values"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="smoke test: " + " ".join(QUICK))
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s != "default" and not (s.isdigit() and int(s) >= 1)]
    if bad or not settings:
        parser.error(f"--settings must list `default` and/or integers >= 1, but got {args.settings!r}")
    if args.quick:
        overrides = [*QUICK, *overrides]
    config = args.config.resolve()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prepare_data(config, tmp / "data")
        for i, setting in enumerate(settings):
            order = (False, True) if i % 2 == 0 else (True, False)
            seconds = {}
            for busy in order:
                label = f"{setting}_{'busy' if busy else 'quiet'}"
                seconds[busy] = timed(config, setting, busy, tmp, label, overrides)
                print(f"threads={setting} {'busy' if busy else 'quiet'}: {seconds[busy]:.1f} s", flush=True)
            ratio = seconds[True] / seconds[False]
            rows.append((setting, seconds[False], seconds[True], ratio))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "CPU": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "config": f"{args.config.name} {' '.join(overrides)}".strip() + (" [--quick]" if args.quick else ""),
        "load average (1 min) before/after": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
    }
    lines = [
        "# Threads: the quickstart with a competing process",
        "",
        "Generated by `python benchmarks/threads.py` (see `benchmarks/README.md`): wall time of `lightning-dropout "
        "tune` on a quiet machine and with one CPU-bound competitor, per `study.threads` setting. "
        f"Target: busy / quiet <= {TARGET}x with the default.",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| study.threads | quiet s | busy s | busy / quiet | <= 1.3x |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {s} | {q:.1f} | {b:.1f} | {r:.2f}x | {'yes' if r <= TARGET else 'NO'} |"
            for s, q, b, r in rows
        ),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
