"""Running a study's trials in ``study.workers`` processes that share its storage: worker 0 in this process,
the others spawned (each re-parses the config from its arguments)."""

from __future__ import annotations

import logging
import multiprocessing
import sys
import warnings

import optuna

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.secrets import redact
from lightning_dropout.tune.runner import Tuner

__all__ = ["run_workers", "worker_main"]


def worker_main(args: list[str], index: int) -> None:
    """The entry point of a spawned worker: run trials for the config ``args`` until the study is done."""
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as in `tune`: one line of ours per failed trial
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # as the CLI does
    try:
        Tuner(args).run_worker(index)
    except DropoutConfigError as err:
        sys.stderr.write(f"lightning-dropout: error: {redact(str(err))}\n")
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: its trial is recorded; the parent says so once
        sys.exit(130)


def run_workers(tuner: Tuner, study: optuna.Study | None = None) -> None:
    """Run the study's trials in ``study.workers`` workers: worker 0 in this process (with ``study`` if given),
    the others in spawned processes, so a study of N workers starts N-1 interpreters, not N."""
    n = tuner.study_config.workers
    if n == 1:
        tuner.run_worker(0, study)
        return
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=worker_main, args=(tuner.args, i), name=f"tune-worker-{i}")
        for i in range(1, n)
    ]
    for proc in procs:
        proc.start()
    try:
        try:
            # the spawned workers need seconds to import: this one asks first, so the startup trials differ
            tuner.run_worker(0, study)
        except DropoutConfigError:  # the others stop on it too (a fatal error ends the study): wait for them
            for proc in procs:
                proc.join()
            raise
        except Exception:  # not a trial's failure (those are recorded): do not leave the others running
            for proc in procs:
                proc.terminate()
                proc.join(timeout=60)
            raise
        for proc in procs:
            proc.join()
        if any(proc.exitcode == 2 for proc in procs):
            raise DropoutConfigError(
                "a worker stopped the study on a configuration error (its message is above)."
            )
    except KeyboardInterrupt:  # the workers got the SIGINT too: let them record their trials, then stop
        for proc in procs:
            proc.join(timeout=60)
        raise
