"""Running a study in ``study.workers`` processes that share its storage: worker 0 in this process, the
others spawned (each re-parses the config from its arguments). The workers run the trials, then share the
re-runs over seeds (:func:`~lightning_dropout.tune.reruns.rerun_share`) before the spawned ones exit: a
spawned worker waits, after its last trial, for this process to say whether there are re-runs to share."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

import optuna

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.secrets import redact
from lightning_dropout.tune.reruns import rerun, rerun_share
from lightning_dropout.tune.runner import Tuner
from lightning_dropout.tune.selection import Candidate

__all__ = ["Workers", "run_workers", "worker_main"]

log = logging.getLogger(__name__)

# what this process tells the spawned workers once every worker's trials are done (`decision`)
_UNDECIDED, _RERUN, _STOP = 0, 1, 2


def worker_main(args: list[str], index: int, trials_done: Any = None, decision: Any = None) -> None:
    """The entry point of a spawned worker: run trials for the config ``args`` until the study is done, set
    ``trials_done``, then wait for ``decision`` and run this worker's share of the re-runs if it says so."""
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as in `tune`: one line of ours per failed trial
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # as the CLI does
    try:
        tuner = Tuner(args)
        tuner.run_worker(index)
        if trials_done is None or decision is None:
            return
        trials_done.set()
        if _await(decision) == _RERUN:
            rerun_share(tuner, tuner.study(), index, tuner.study_config.workers)
    except DropoutConfigError as err:
        sys.stderr.write(f"lightning-dropout: error: {redact(str(err))}\n")
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: its trial is recorded; the parent says so once
        sys.exit(130)


def _await(decision: Any, poll: float = 0.2) -> int:
    """The parent's decision; ``_STOP`` if the parent is gone (nothing would gather the re-runs)."""
    parent = os.getppid()
    while decision.value == _UNDECIDED:
        if os.getppid() != parent:
            return _STOP
        time.sleep(poll)
    return int(decision.value)


class Workers:
    """The ``study.workers`` workers of one ``tune`` run: this process (worker 0) and the spawned others.

    Use as a context manager: :meth:`run_trials`, then optionally :meth:`rerun`; leaving the block tells the
    spawned workers there is nothing more (or, on an error, stops them) and waits for them.
    """

    def __init__(self, tuner: Tuner, poll: float = 0.2) -> None:
        self.tuner = tuner
        self.n = tuner.study_config.workers
        self.poll = poll
        self._procs: list[Any] = []
        self._done: list[Any] = []
        self._decision: Any = None

    def __enter__(self) -> Workers:
        if self.n > 1:
            context = multiprocessing.get_context("spawn")
            self._decision = context.Value("i", _UNDECIDED, lock=False)
            self._done = [context.Event() for _ in range(1, self.n)]
            self._procs = [
                context.Process(
                    target=worker_main,
                    args=(self.tuner.args, i, done, self._decision),
                    name=f"tune-worker-{i}",
                )
                for i, done in zip(range(1, self.n), self._done, strict=True)
            ]
            for proc in self._procs:
                proc.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._decide(_STOP)
        if kind is None:
            self._join()
        elif issubclass(kind, KeyboardInterrupt):  # the workers got the SIGINT too: they record their trials
            self._join(timeout=60)
        elif issubclass(kind, DropoutConfigError):  # the others stop on it too (a fatal error ends the study)
            self._join()
        else:  # not a trial's failure (those are recorded): do not leave the others running
            for proc in self._procs:
                proc.terminate()
            self._join(timeout=60)

    def _decide(self, decision: int) -> None:
        if self._decision is not None and self._decision.value == _UNDECIDED:
            self._decision.value = decision

    def _join(self, timeout: float | None = None) -> None:
        for proc in self._procs:
            proc.join(timeout=timeout)

    def run_trials(self, study: optuna.Study | None = None) -> None:
        """Run trials in every worker until the study holds ``n_trials`` finished ones; return once all
        workers' trials are done (this one passes ``study`` if given)."""
        # the spawned workers need seconds to import: this one asks first, so the startup trials differ
        self.tuner.run_worker(0, study)
        for proc, done in zip(self._procs, self._done, strict=True):
            while not done.wait(self.poll) and proc.is_alive():
                pass
        if any(proc.exitcode == 2 for proc in self._procs):
            raise DropoutConfigError(
                "a worker stopped the study on a configuration error (its message is above)."
            )

    def rerun(self, study: optuna.Study, on_done: Callable[[str], None] | None = None) -> list[Candidate]:
        """Share the re-runs over seeds between the workers still running, then gather them (running here
        whatever a worker left undone); best mean first (see :func:`~lightning_dropout.tune.reruns.rerun`)."""
        alive = [proc for proc in self._procs if proc.is_alive()]
        if len(alive) == len(self._procs):  # each worker takes its index's share
            self._decide(_RERUN)
            rerun_share(self.tuner, study, 0, self.n, on_done)
            self._join()
        else:  # a worker died: the shares would leave its part to the end; run them all here
            self._decide(_STOP)
        return rerun(self.tuner, study, on_done)


def run_workers(tuner: Tuner, study: optuna.Study | None = None) -> None:
    """Run the study's trials in ``study.workers`` workers: worker 0 in this process (with ``study`` if given),
    the others in spawned processes, so a study of N workers starts N-1 interpreters, not N."""
    with Workers(tuner) as workers:
        workers.run_trials(study)
