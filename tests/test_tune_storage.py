"""``tune`` against a real PostgreSQL storage: two worker processes sharing a study, a SIGKILLed worker (its trial
is failed by the heartbeat and retried), and Ctrl-C (the storage stays loadable and the study can be finished).

Every storage URL carries a password (the throwaway server trusts local connections and ignores it); it must
never reach the output nor the run directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from lightning_dropout.cli import main
from lightning_dropout.tune import records

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
WORKER = SCRIPTS / "tune_worker.py"
CONFIG = str(ROOT / "configs" / "mnist1d_mlp.yaml")
PASSWORD = "pw-7Kq2-never-printed"
PID_ATTR = "worker_pid"  # set by tune_worker.PidRecorder
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

SHORT = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
]
LONG = [
    "--trainer.max_epochs=100000",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
]


@dataclass
class Postgres:
    url: str  # with a password
    password: str


@pytest.fixture(scope="module")
def pg(postgres_url: str) -> Postgres:
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    if not url.password:
        url = url.set(password=PASSWORD)
    pg = Postgres(url.render_as_string(hide_password=False), str(url.password))
    # Create Optuna's tables now, from one thread: two first connections racing on a fresh database both
    # CREATE TYPE and one fails (Optuna's RDBStorage schema creation is not concurrency-safe).
    _plain_storage(pg.url)
    return pg


def _study_args(pg: Postgres, name: str, run_dir: Path, n_trials: int, *extra: str) -> list[str]:
    return [
        CONFIG,
        f"--study.name={name}",
        f"--study.storage={pg.url}",
        f"--study.run_dir={run_dir}",
        f"--study.n_trials={n_trials}",
        "--study.seeds=0",
        *extra,
    ]


def _name(kind: str) -> str:
    return f"ld-{kind}-{uuid.uuid4().hex[:10]}"


@functools.cache
def _plain_storage(url: str) -> optuna.storages.RDBStorage:
    """The study as an observer sees it: no heartbeat, so looking never fails or retries a trial."""
    return optuna.storages.RDBStorage(url)


def _trials(pg: Postgres, name: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=_plain_storage(pg.url)).get_trials()


def _assert_secret_not_printed(pg: Postgres, output: str) -> None:
    assert pg.password not in output, "the storage password was printed"
    assert ":***@" in output, "the redacted storage URL was not printed"


def _files_with_secret(pg: Postgres, run_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and pg.password.encode() in p.read_bytes()
    )


def _worker_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SCRIPTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@contextlib.contextmanager
def _tune_process(args: list[str], log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``lightning-dropout tune ARGS`` in its own process group (what a terminal's Ctrl-C reaches); killed on
    the way out if still running."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_worker_env(**env),
            cwd=log.parent,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait_training(pg: Postgres, name: str, proc: subprocess.Popen[bytes], log: Path) -> FrozenTrial:
    """Wait until a trial of the study is RUNNING and has reported a validation result (it is mid-fit)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"tune exited with {proc.returncode} before training:\n{log.read_text()[-3000:]}"
            )
        with contextlib.suppress(KeyError):  # the study is not created yet
            for trial in _trials(pg, name):
                if trial.state == TrialState.RUNNING and trial.intermediate_values:
                    return trial
        time.sleep(0.3)
    raise AssertionError(f"no trial started training within 180 s:\n{log.read_text()[-3000:]}")


# ----------------------------------------------------------------------------------------------------------
# Two worker processes on one PostgreSQL study
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TwoWorkerRun:
    name: str
    returncode: int
    output: str
    trials: list[FrozenTrial]
    main_pid: int
    run_dir: Path


@pytest.fixture(scope="module")
def two_workers(pg: Postgres, tmp_path_factory: pytest.TempPathFactory) -> TwoWorkerRun:
    """``tune --study.workers=2`` as its own process; every trial records its process id and each worker's
    first trial waits until the other worker has started one (so both provably take part, in parallel)."""
    tmp = tmp_path_factory.mktemp("two_workers")
    name = _name("workers")
    recorder = {
        "class_path": "tune_worker.PidRecorder",
        "init_args": {"barrier_dir": str(tmp / "barrier"), "parties": 2, "timeout": 120.0},
    }
    args = _study_args(
        pg,
        name,
        tmp / "runs",
        4,
        *SHORT,
        "--study.workers=2",
        f"--trainer.callbacks={json.dumps([recorder])}",
    )
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_worker_env(),
        cwd=tmp,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return TwoWorkerRun(
        name, proc.returncode, output.decode(errors="replace"), _trials(pg, name), proc.pid, tmp / "runs"
    )


def test_two_workers_share_a_postgres_study(pg: Postgres, two_workers: TwoWorkerRun) -> None:
    run = two_workers
    assert run.returncode == 0, run.output[-4000:]
    assert "Traceback" not in run.output, run.output[-4000:]  # neither worker process died with an error
    assert len(run.trials) >= 4 and all(t.state == TrialState.COMPLETE for t in run.trials), [
        (t.number, t.state.name, t.user_attrs.get(records.FAIL_ATTR)) for t in run.trials
    ]
    assert sum(records.BASELINE_ATTR in t.user_attrs for t in run.trials) == 1
    assert all(records.PLAN_ATTR in t.user_attrs and records.METRICS_ATTR in t.user_attrs for t in run.trials)
    # two worker processes ran the trials: the `tune` process itself (worker 0) and the one it spawned
    pids = {t.user_attrs.get(PID_ATTR) for t in run.trials}
    assert len(pids) == 2 and None not in pids and run.main_pid in pids, pids
    # ... at the same time: two trials of different workers overlap
    overlapping = [
        (a.number, b.number)
        for a in run.trials
        for b in run.trials
        if a.user_attrs[PID_ATTR] < b.user_attrs[PID_ATTR]
        and a.datetime_start < b.datetime_complete
        and b.datetime_start < a.datetime_complete
    ]
    assert overlapping, [(t.number, t.datetime_start, t.datetime_complete) for t in run.trials]
    # ... and the spawned one is gone (joined) once `tune` returns
    for pid in pids - {run.main_pid}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    _assert_secret_not_printed(pg, run.output)


def test_two_workers_sample_different_plans(two_workers: TwoWorkerRun) -> None:
    sampled = [t for t in two_workers.trials if records.BASELINE_ATTR not in t.user_attrs]
    assert len(sampled) >= 2
    params = [json.dumps(t.params, sort_keys=True) for t in sampled]
    assert len(set(params)) == len(params), [(t.number, t.user_attrs[PID_ATTR], t.params) for t in sampled]


def test_two_workers_write_no_password_to_the_run_dir(pg: Postgres, two_workers: TwoWorkerRun) -> None:
    assert _files_with_secret(pg, two_workers.run_dir) == []


# ----------------------------------------------------------------------------------------------------------
# A worker killed with SIGKILL: the heartbeat fails its trial and re-queues it
# ----------------------------------------------------------------------------------------------------------
def test_sigkilled_worker_trial_is_failed_by_the_heartbeat_and_retried(
    pg: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # A 1 s heartbeat (grace 2 s) instead of 10 s (grace 20 s): in this process through the module constant,
    # in the worker process through tune_worker.py's $TUNE_TEST_HEARTBEAT_INTERVAL. The mechanism is the same.
    monkeypatch.setattr(records, "HEARTBEAT_INTERVAL", 1)
    name, run_dir = _name("sigkill"), tmp_path / "runs"
    # two completed trials first (the baseline and one sampled plan)
    assert main(["tune", *_study_args(pg, name, run_dir, 2, *SHORT)]) == 0
    completed = {t.number: t.value for t in _trials(pg, name) if t.state == TrialState.COMPLETE}
    assert len(completed) == 2

    log = tmp_path / "killed.log"
    with _tune_process(
        _study_args(pg, name, run_dir, 3, *LONG), log, TUNE_TEST_HEARTBEAT_INTERVAL="1"
    ) as proc:
        victim = _wait_training(pg, name, proc, log)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert victim.params, "the killed trial should be a sampled one"
    assert next(t for t in _trials(pg, name) if t.number == victim.number).state == TrialState.RUNNING

    time.sleep(2 * records.HEARTBEAT_INTERVAL + 1)  # past the grace period
    assert main(["tune", *_study_args(pg, name, run_dir, 3, *SHORT)]) == 0

    trials = {t.number: t for t in _trials(pg, name)}
    assert trials[victim.number].state == TrialState.FAIL  # stale: failed by the heartbeat
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1, [(t.number, t.state.name, t.system_attrs) for t in trials.values()]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == victim.number
    # nothing completed before was lost or changed, nothing is left running or queued
    assert {n: trials[n].value for n in completed} == completed
    assert all(trials[n].state == TrialState.COMPLETE for n in completed)
    assert all(t.state in FINISHED for t in trials.values())

    output = capfd.readouterr()
    _assert_secret_not_printed(pg, output.out + output.err + log.read_text())


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C: SIGINT to a running `tune`
# ----------------------------------------------------------------------------------------------------------
def _tune_interrupted(pg: Postgres, name: str, args: list[str]) -> tuple[int | str, FrozenTrial]:
    """Ctrl-C during a trial: SIGINT to this process while ``main(["tune", ...])`` trains in its main thread,
    which is what a terminal's Ctrl-C does to a one-worker ``tune`` (in-process: no second import of torch and
    Lightning). A watcher thread sends it once a trial is mid-fit; the SIGINT handler is restored afterwards
    (Lightning sets it to SIG_IGN while it shuts down). Returns the exit status and the interrupted trial."""
    found: list[FrozenTrial] = []
    seen: list[str] = []  # what the watcher saw last, for the failure message
    stop = threading.Event()

    def interrupt_when_training() -> None:
        storage = optuna.storages.RDBStorage(pg.url)  # its own engine: nothing shared with earlier tests
        deadline = time.monotonic() + 180
        while not stop.is_set() and time.monotonic() < deadline:
            # the study may not exist yet (KeyError), or its schema may be being created by `tune` right now
            # (a loaded machine makes that window long): keep watching rather than let the thread die
            try:
                trials = optuna.load_study(study_name=name, storage=storage).get_trials()
                seen[:] = [f"{t.number}:{t.state.name}:{len(t.intermediate_values)}" for t in trials]
                running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
            except Exception as err:
                seen[:] = [f"{type(err).__name__}: {err}"[:300]]
                running = []
            if running and not stop.is_set():
                found.append(running[0])
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)
        if (
            not stop.is_set()
        ):  # never hang the suite on an endless trial: stop it, the assertion below reports
            os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # what a terminal's process has
    watcher = threading.Thread(target=interrupt_when_training, daemon=True)
    returncode: int | str
    try:
        watcher.start()
        try:
            returncode = main(["tune", *args])
        except KeyboardInterrupt:  # must not reach pytest, which would end the session
            returncode = "KeyboardInterrupt"
    finally:
        stop.set()
        watcher.join(timeout=10)
        signal.signal(signal.SIGINT, handler)
    assert found, f"no trial started training (tune returned {returncode!r}); the watcher last saw {seen}"
    return returncode, found[0]


def test_ctrl_c_fails_the_running_trial_and_a_rerun_finishes_the_study(
    pg: Postgres, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    name, run_dir = _name("sigint"), tmp_path / "runs"
    returncode, victim = _tune_interrupted(pg, name, _study_args(pg, name, run_dir, 3, *LONG))
    first = capfd.readouterr()
    assert returncode == 130, first.err[-3000:]
    assert re.search(r"lightning-dropout: interrupted; \d+ trials? kept; re-run to resume", first.err), (
        first.err
    )
    assert "Traceback" not in first.out + first.err
    # the storage is consistent: the study loads (as `tune`/`best` open it), the trial is failed, not running
    study = optuna.load_study(study_name=name, storage=records.open_storage(pg.url))
    after = {t.number: t for t in study.get_trials()}
    assert after[victim.number].state == TrialState.FAIL
    assert after[victim.number].user_attrs.get(records.FAIL_ATTR) == records.INTERRUPTED
    assert all(t.state in FINISHED or t.state == TrialState.WAITING for t in after.values()), after

    # running `tune` again finishes the study: n_trials trials that count (the interrupted one does not)
    assert main(["tune", *_study_args(pg, name, run_dir, 3, *SHORT)]) == 0
    trials = _trials(pg, name)
    counted = [
        t
        for t in trials
        if t.state in FINISHED and t.user_attrs.get(records.FAIL_ATTR) != records.INTERRUPTED
    ]
    assert len(counted) >= 3 and all(t.state == TrialState.COMPLETE for t in counted), [
        (t.number, t.state.name, t.user_attrs.get(records.FAIL_ATTR)) for t in trials
    ]
    assert all(t.state in FINISHED for t in trials)  # nothing left running or queued
    assert next(t for t in trials if t.number == victim.number).state == TrialState.FAIL
    if records.BASELINE_ATTR in victim.user_attrs:  # an interrupted baseline is run again
        baseline = victim.user_attrs[records.BASELINE_ATTR]
        assert any(t.user_attrs.get(records.BASELINE_ATTR) == baseline for t in counted)
    second = capfd.readouterr()
    _assert_secret_not_printed(pg, first.out + first.err + second.out + second.err)
