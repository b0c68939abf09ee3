"""Running a study in ``study.workers`` processes that share its storage: worker 0 in this process, the
others spawned (each re-parses the config from its arguments).

The workers run the trials, then share the race over seeds (:mod:`~lightning_dropout.tune.reruns`): each claims
the next run of the current round from a counter they share (:class:`~lightning_dropout.tune.reruns.Claims`)
and waits for the round's other runs before the next. The baselines' re-runs (from a counter of their own) are
claimed as soon as a worker's own trials are done; the race waits until every worker's trials are done (the
candidates are known then), which this process tells the spawned workers.

Each worker may get GPUs of its own (:mod:`~lightning_dropout.tune.devices`): a spawned worker starts with its
``CUDA_VISIBLE_DEVICES`` in its environment, this process sets worker 0's on itself while the workers run (and
restores it after); the trial processes of DDP trials inherit their worker's."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

import optuna

from lightning_dropout._worker_start import children_ignore_sigint, start_worker
from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.redaction import redact
from lightning_dropout.tune.devices import VISIBLE_ENV, gpu_environment
from lightning_dropout.tune.pbt import run_population
from lightning_dropout.tune.reruns import Claims, rerun, run_claimed_baselines, run_race
from lightning_dropout.tune.runner import Tuner
from lightning_dropout.tune.selection import Candidate

__all__ = ["Workers", "run_worker", "run_workers", "worker_main"]

log = logging.getLogger(__name__)

_CTRL_C_GRACE = 5.0  # seconds the workers get to stop on a Ctrl-C before it is sent to them again

# what this process tells the spawned workers once every worker's trials are done (`decision`)
_UNDECIDED, _RERUN, _STOP = 0, 1, 2


def worker_main(
    args: list[str],
    index: int,
    trials_done: Any = None,
    decision: Any = None,
    claims: Any = None,
    early: Any = None,
) -> None:
    """The entry point of a spawned worker: run trials for the config ``args`` until the study is done, set
    ``trials_done``; then, with re-runs over seeds, claim (through the shared counter ``early``) the baselines'
    re-runs, wait for ``decision`` and, if it says so, run its share of the race (shared counter ``claims``)."""
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as in `tune`: one line of ours per failed trial
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # as the CLI does
    try:
        tuner = Tuner(args)
        run_worker(tuner, index)
        if trials_done is None or decision is None:
            return
        trials_done.set()
        if (tuner.study_config.seeds or 0) < 2:
            return
        study = tuner.study()
        parent = os.getppid()
        run_claimed_baselines(tuner, study, Claims(early), stop=lambda: decision.value == _STOP)
        if _await(decision) == _RERUN:
            # the parent gathers what is left if this worker stops; it stops when the parent is gone
            run_race(tuner, study, Claims(claims), rescue=lambda: False, stop=lambda: os.getppid() != parent)
    except DropoutConfigError as err:
        sys.stderr.write(f"lightning-dropout: error: {redact(str(err))}\n")
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: its trial is recorded; the parent says so once
        sys.exit(130)


def run_worker(tuner: Tuner, index: int = 0, study: optuna.Study | None = None) -> None:
    """One worker's share of the study: sampled trials (:meth:`Tuner.run_worker`), or with ``study.method: pbt``
    the population's segments (:func:`~lightning_dropout.tune.pbt.run_population`)."""
    if tuner.study_config.method == "pbt":
        run_population(tuner, study)
    else:
        tuner.run_worker(index, study)


def _await(decision: Any, poll: float = 0.2) -> int:
    """The parent's decision; ``_STOP`` if the parent is gone (nothing would gather the re-runs)."""
    parent = os.getppid()
    while decision.value == _UNDECIDED:
        if os.getppid() != parent:
            return _STOP
        time.sleep(poll)
    return int(decision.value)


def _guard_hint() -> str:
    """The usual cause of a spawned worker dying on start when the study runs from a script (not the
    ``lightning-dropout`` command): the script has no ``__main__`` guard, and spawn re-imports it."""
    path = str(getattr(sys.modules.get("__main__"), "__file__", None) or "")
    if not path or "lightning-dropout" in os.path.basename(path) or "lightning_dropout" in path:
        return ""
    return (
        f' If {os.path.basename(path)} starts the study, it needs `if __name__ == "__main__":` around that call: '
        "each spawned worker re-imports it."
    )


class Workers:
    """The ``study.workers`` workers of one ``tune`` run: this process (worker 0) and the spawned others.

    Use as a context manager: :meth:`run_trials`, then optionally :meth:`rerun`; leaving the block tells the
    spawned workers there is nothing more (or, on an error, stops them) and waits for them.
    """

    def __init__(self, tuner: Tuner, poll: float = 0.2) -> None:
        self.tuner = tuner
        place = getattr(tuner, "place_workers", None)  # resolves `workers: auto` and each worker's GPUs
        self.gpu_sets: tuple[str, ...] = place().sets if callable(place) else ()
        workers = tuner.study_config.workers  # a number once place_workers resolved `auto`
        self.n = workers if isinstance(workers, int) else 1
        self._own_gpus = contextlib.ExitStack()
        self.poll = poll
        self._procs: list[Any] = []
        self._done: list[Any] = []
        self._decision: Any = None
        self._claims = Claims()
        self._early = Claims()
        self._dead: set[int] = set()  # the spawned workers already reported dead (indices into _procs)
        self._watch_lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _gpus(self, index: int) -> str | None:
        return self.gpu_sets[index] if self.gpu_sets else None

    def __enter__(self) -> Workers:
        if self.gpu_sets:
            _check_cuda_unused(self.gpu_sets[0])
        if self.n > 1:
            context = multiprocessing.get_context("spawn")
            self._decision = context.Value("i", _UNDECIDED, lock=False)
            self._claims = Claims(context.Value("i", 0))
            self._early = Claims(context.Value("i", 0))
            self._done = [context.Event() for _ in range(1, self.n)]
            self._procs = [
                context.Process(
                    target=start_worker,  # worker_main, quiet on a Ctrl-C while it imports
                    args=(
                        f"{__name__}:{worker_main.__name__}",
                        self.tuner.args,
                        i,
                        done,
                        self._decision,
                        self._claims.counter,
                        self._early.counter,
                    ),
                    name=f"tune-worker-{i}",
                )
                for i, done in zip(range(1, self.n), self._done, strict=True)
            ]
            for i, proc in enumerate(self._procs, start=1):
                # the child's environment from its first instruction; a Ctrl-C ignored until its handler is set
                with gpu_environment(self._gpus(i)), children_ignore_sigint():
                    proc.start()
            self._watcher = threading.Thread(target=self._watch, name="tune-worker-watch", daemon=True)
            self._watcher.start()
        self._own_gpus.enter_context(gpu_environment(self._gpus(0)))  # worker 0: this process
        return self

    def _watch(self) -> None:
        while not self._watch_stop.wait(max(self.poll, 0.5)):
            self.report_dead()

    def report_dead(self) -> list[int]:
        """Report, in one line each, the spawned workers that have died (a non-zero exit code other than a
        configuration error's 2 or Ctrl-C's 130), with the count of workers left; return the indices of those
        newly reported. Called by a watcher thread every poll, and once more when the trials and the re-runs
        end."""
        newly = []
        with self._watch_lock:
            for i, proc in enumerate(self._procs):
                code = proc.exitcode if not proc.is_alive() else None
                if i in self._dead or code in (None, 0, 2, 130):
                    continue
                self._dead.add(i)
                newly.append(i)
                left = 1 + sum(p.is_alive() for p in self._procs)
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                log.warning(
                    "tune worker %d %s; %d of %d workers left.%s", i + 1, how, left, self.n, _guard_hint()
                )
        return newly

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._own_gpus.close()
        self._decide(_STOP)
        self._watch_stop.set()  # from here on, workers end because this process says so
        if self._watcher is not None:
            self._watcher.join()
        if kind is None:
            self._join()
        elif issubclass(kind, KeyboardInterrupt):  # the workers got the SIGINT too: they record their trials
            self._join(timeout=_CTRL_C_GRACE)
            self._interrupt_alive()  # one still starting when the Ctrl-C came had it ignored
            self._join(timeout=30)
            self._stop_stragglers()  # never wait on one forever (Python's exit would join it: a hang)
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
        deadline = None if timeout is None else time.monotonic() + timeout
        for proc in self._procs:
            proc.join(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _interrupt_alive(self) -> None:
        """Send the Ctrl-C again to the workers still running: once each, so one that is recording its own
        interrupted trial is not interrupted twice."""
        for proc in self._procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)

    def _stop_stragglers(self) -> None:
        """Terminate, then kill, the workers still alive: their running trial stays RUNNING in the storage,
        where the heartbeat (RDB storages) fails it and a resumed study retries it."""
        alive = [proc for proc in self._procs if proc.is_alive()]
        if not alive:
            return
        log.warning("%d worker(s) did not stop on Ctrl-C within 30 s: terminating them", len(alive))
        for proc in alive:
            proc.terminate()
        for proc in alive:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def _trials_done(self) -> bool:
        """Whether every spawned worker's trials are done (a dead worker's too)."""
        return all(
            done.is_set() or not proc.is_alive() for proc, done in zip(self._procs, self._done, strict=True)
        )

    def run_trials(self, study: optuna.Study | None = None) -> None:
        """Run trials in every worker until the study holds ``n_trials`` finished ones; return once all
        workers' trials are done (this one passes ``study`` if given). With re-runs over seeds, this worker
        runs the baselines' re-runs while it waits for the others' last trials."""
        # the spawned workers need seconds to import: this one asks first, so the startup trials differ
        run_worker(self.tuner, 0, study)
        if self._procs and (self.tuner.study_config.seeds or 0) > 1:
            study = study if study is not None else self.tuner.study()
            run_claimed_baselines(self.tuner, study, self._early, stop=self._trials_done)
        while not self._trials_done():
            time.sleep(self.poll)
        self.report_dead()
        if any(proc.exitcode == 2 for proc in self._procs):
            raise DropoutConfigError(
                "a worker stopped the study on a configuration error (its message is above)."
            )

    def rerun(self, study: optuna.Study, on_done: Callable[[str], None] | None = None) -> list[Candidate]:
        """Share the race over seeds between the workers, then gather it (running here whatever a worker left
        undone); best mean first (see :func:`~lightning_dropout.tune.reruns.rerun`)."""
        self._decide(_RERUN)
        run_race(self.tuner, study, self._claims, on_done, rescue=self._lost_worker)
        self._join()
        self.report_dead()
        return rerun(self.tuner, study, on_done)

    def _lost_worker(self) -> bool:
        """Whether a spawned worker is gone (its claimed runs then run here)."""
        return any(not proc.is_alive() for proc in self._procs)


def _check_cuda_unused(first: str) -> None:
    """Worker 0 runs in this process: CUDA must not be initialized here yet, or ``CUDA_VISIBLE_DEVICES`` would
    no longer limit it to its GPUs (Lightning counts GPUs through NVML and leaves CUDA alone until a trial)."""
    import torch

    if torch.cuda.is_initialized() and os.environ.get(VISIBLE_ENV) != first:  # type: ignore[no-untyped-call]
        raise DropoutConfigError(
            f"the `tune` process must not use CUDA before its workers get their GPUs (worker 0: {first}), but CUDA "
            "is already initialized (a model, datamodule or callback that moves to the GPU when built?); move "
            "tensors in setup() or configure_model(), or run one worker (`study.workers: 1`)."
        )


def run_workers(tuner: Tuner, study: optuna.Study | None = None) -> None:
    """Run the study's trials in ``study.workers`` workers: worker 0 in this process (with ``study`` if given),
    the others in spawned processes, so a study of N workers starts N-1 interpreters, not N."""
    with Workers(tuner) as workers:
        workers.run_trials(study)
