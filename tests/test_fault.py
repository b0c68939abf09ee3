"""Faults on a shared study: two ``tune`` processes join one PostgreSQL study (the documented multi-machine
mode), then a third is killed with SIGKILL mid-trial and a fourth resumes. No two trials share their
parameters unless Optuna enqueued them (baselines, the heartbeat's retry of the killed trial), and no completed
trial is lost or run again."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from studies import error_line, write_config

from lightning_dropout.tune import records
from lightning_dropout.tune.records import DUPLICATE, fixed_label

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "scripts" / "tune_worker.py"
CONFIG = str(ROOT / "configs" / "mnist1d_mlp.yaml")
SHORT = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
LONG = ["--trainer.max_epochs=100000", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


def _worker_env(**extra: str) -> dict[str, str]:
    """The environment of a ``tune_worker.py`` process (``extra``: e.g. its heartbeat interval)."""
    path = os.pathsep.join(p for p in (str(WORKER.parent), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _worker_args(
    name: str, url: str, tmp_path: Path, data_dir: Path, n_trials: int, *extra: str
) -> list[str]:
    """``tune`` of the MLP config on study ``name`` in ``url``, without re-runs, through ``tune_worker.py``."""
    return [
        sys.executable,
        str(WORKER),
        CONFIG,
        f"--study.name={name}",
        f"--study.storage={url}",
        f"--study.run_dir={tmp_path / 'runs'}",
        f"--study.n_trials={n_trials}",
        "--study.seeds=0",
        f"--data.init_args.cache_dir={data_dir}",
        *extra,
    ]


def _enqueued(trial: FrozenTrial) -> bool:
    """Enqueued by the tuner (a baseline) or by Optuna's heartbeat (the retry of a stale trial)."""
    return (
        "fixed_params" in trial.system_attrs
        or "failed_trial" in trial.system_attrs
        or records.BASELINE_ATTR in trial.user_attrs
    )


def test_joined_killed_and_resumed_study_repeats_and_loses_nothing(postgres_url, tmp_path, data_dir):
    url = make_url(postgres_url).set(password="fault-pw").render_as_string(hide_password=False)
    storage = optuna.storages.RDBStorage(url)  # Optuna's tables, created once before the racing processes
    name = f"ld-fault-{uuid.uuid4().hex[:10]}"
    env = _worker_env(TUNE_TEST_HEARTBEAT_INTERVAL="1")

    def args(n_trials: int, budget: list[str]) -> list[str]:
        # with the warm-start grid (the default): two processes starting at once may both enqueue it; the later
        # twin of each fixed trial is recorded as a duplicate and not run
        return _worker_args(name, url, tmp_path, data_dir, n_trials, *budget)

    def trials() -> list[FrozenTrial]:
        return optuna.load_study(study_name=name, storage=storage).get_trials()

    # 1. two processes join one study, as two machines would
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [
        subprocess.Popen(
            args(6, SHORT), stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
        for log in logs
    ]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    before = {t.number: t for t in trials() if t.state == TrialState.COMPLETE}
    assert len(before) >= 6

    # 2. a third process is killed with SIGKILL while it trains a trial
    log = tmp_path / "killed.log"
    killed = subprocess.Popen(
        args(9, LONG),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        victim = None
        while victim is None and time.monotonic() < deadline:
            assert killed.poll() is None, log.read_text()[-3000:]
            running = [t for t in trials() if t.state == TrialState.RUNNING and t.intermediate_values]
            victim = running[0] if running else None
            time.sleep(0.3)
        assert victim is not None, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)

    # 3. resume: the heartbeat fails the killed trial and re-queues it; the study reaches n_trials
    time.sleep(3)  # past the 2 s grace period of a 1 s heartbeat
    log = tmp_path / "resumed.log"
    resumed = subprocess.run(
        args(9, SHORT), stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path
    )
    assert resumed.returncode == 0, log.read_text()[-3000:]

    after = {t.number: t for t in trials()}
    # no completed trial was lost or changed
    for number, trial in before.items():
        assert after[number].state == TrialState.COMPLETE
        assert (after[number].params, after[number].value) == (trial.params, trial.value)
    # no two trials share their parameters unless enqueued
    sampled = [t for t in after.values() if not _enqueued(t)]
    params = [json.dumps(t.params, sort_keys=True) for t in sampled]
    duplicates = len(params) - len(set(params))
    assert duplicates == 0, [(t.number, t.state.name, t.params) for t in sampled]
    # the killed trial was failed and run again once (as an enqueued retry), nothing else was re-run
    assert after[victim.number].state == TrialState.FAIL
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in after.values())
    # each fixed trial (baseline, grid point) completed once; any twin was failed as a duplicate, untrained
    fixed = [t for t in after.values() if fixed_label(t)]
    labels = [fixed_label(t) for t in fixed if t.state == TrialState.COMPLETE]
    assert len(labels) == len(set(labels)) and set(labels) == {fixed_label(t) for t in fixed}, labels
    # every other trial of a fixed label is a twin some worker enqueued too: failed as one, never trained (the
    # race itself is forced in tests/test_tune.py::test_a_fixed_trial_enqueued_twice_runs_once)
    for trial in fixed:
        if trial.state != TrialState.COMPLETE and trial.number != victim.number:
            assert trial.user_attrs.get("fail_reason") == DUPLICATE, (trial.number, trial.user_attrs)
            assert not trial.intermediate_values, trial.number
    print(f"fault test: {len(after)} trials, {duplicates} duplicates")  # shown with -s


def _open_at_once(url: str, barrier: Any, results: Any) -> None:
    barrier.wait()  # every process creates the tables of the fresh file at the same moment
    try:
        records.open_storage(url)
        results.put("ok")
    except Exception as err:
        results.put(f"{type(err).__name__}: {err}"[:300])


@pytest.mark.skipif(sys.platform != "linux", reason="forks 4 processes at once")
def test_four_processes_creating_a_fresh_sqlite_study_at_once_all_succeed(tmp_path):
    """Two workers starting on an empty SQLite file both create Optuna's tables; the loser used to fail with
    "table studies already exists" (8 times in 10 with 4 processes). It now finds the tables on a retry."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'fresh{round_}' / 'study.db'}"
        barrier, results = context.Barrier(4), context.Queue()
        procs = [context.Process(target=_open_at_once, args=(url, barrier, results)) for _ in range(4)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert outcomes == ["ok"] * 4, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_study_killed_and_resumed_at_once_reaches_exactly_n_trials(backend, request, tmp_path, data_dir):
    """kill -9 of a two-worker ``tune`` while both train, then a resume started at once, within the heartbeat's
    grace period: the killed trials are still RUNNING when it starts. They used to count as busy for good (the
    resumed study stopped short of ``n_trials`` and left RUNNING zombies); now the resume waits for their
    heartbeat to go stale, fails them, runs their retries, and ends with exactly ``n_trials`` finished trials,
    each killed trial counted once (as its retry)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'study.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    optuna.storages.RDBStorage(url)  # Optuna's tables, before the two workers race on them
    name = f"ld-kill-{uuid.uuid4().hex[:10]}"
    n_trials = 4
    common = _worker_args(
        name,
        url,
        tmp_path,
        data_dir,
        n_trials,
        "--study.warm_start=false",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
    )

    def trials() -> list[FrozenTrial]:
        return optuna.load_study(study_name=name, storage=url).get_trials()

    log = tmp_path / "killed.log"
    killed = subprocess.Popen(
        [*common, "--study.workers=2", "--trainer.max_epochs=100000"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=_worker_env(TUNE_TEST_HEARTBEAT_INTERVAL="2"),
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert killed.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(KeyError):  # KeyError: the study is not created yet
                if sum(t.state == TrialState.RUNNING and bool(t.intermediate_values) for t in trials()) >= 2:
                    break
            time.sleep(0.3)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    victims = [t.number for t in trials() if t.state == TrialState.RUNNING]
    assert len(victims) == 2, log.read_text()[-3000:]

    # at once: the resumed process's grace period (2 x 10 s, the product's own) outlasts its start-up, even on a
    # loaded CI machine (2 x 5 s did not)
    log = tmp_path / "resumed.log"
    resumed = subprocess.run(
        [*common, "--study.workers=1", "--trainer.max_epochs=2"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=_worker_env(TUNE_TEST_HEARTBEAT_INTERVAL="10"),
        cwd=tmp_path,
        timeout=240,
    )
    assert resumed.returncode == 0, log.read_text()[-3000:]
    after = trials()
    assert not [t.number for t in after if t.state == TrialState.RUNNING], "a RUNNING zombie was left"
    for number in victims:
        assert after[number].state == TrialState.FAIL
        retries = [t for t in after if number in t.system_attrs.get("retry_history", ())]
        assert len(retries) == 1 and retries[0].state.is_finished()
    # the resume started within the grace period: it ran a trial of its own before the killed ones went stale
    retry_numbers = [t.number for t in after if "retry_history" in t.system_attrs]
    fresh = [t.number for t in after if t.number > max(victims) and t.number not in retry_numbers]
    assert fresh and min(fresh) < min(retry_numbers), (fresh, retry_numbers)
    study = optuna.load_study(study_name=name, storage=url)
    assert records.finished_trials(study) == n_trials, [(t.number, t.state.name) for t in after]


def _tune(
    config: Path, storage: str, tmp_path: Path, data_dir: Path, *extra: str, file_limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``lightning-dropout tune`` of ``config`` on ``storage`` in its own process; with ``file_limit`` no file
    it writes may grow past that many bytes (RLIMIT_FSIZE: a full disk, as SQLite and the OS report it)."""

    def cap() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    cmd = [sys.executable, "-m", "lightning_dropout.cli", "tune", str(config), f"--study.storage={storage}"]
    cmd += [f"--study.run_dir={tmp_path / 'runs'}", f"--data.init_args.cache_dir={data_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=cap)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The run's one error line (exit 2, no traceback)."""
    return error_line(done.stderr, rc=done.returncode)


def test_a_full_disk_stops_the_study_in_one_line_keeping_what_is_stored(tmp_path, data_dir):
    """A storage that can no longer grow (here: a file-size limit on the study's process, which SQLite reports as
    a disk I/O error, as it reports a full disk) stops the study at its first failed write, in one line; the
    trials stored before are kept, and the same command resumes once there is room."""
    config = write_config(tmp_path, study={"n_trials": 2, "workers": 1})
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    assert _tune(config, url, tmp_path, data_dir).returncode == 0
    limit = db.stat().st_size + 16384  # room for a few more trials, not for 30

    line = _one_error_line(_tune(config, url, tmp_path, data_dir, "--study.n_trials=30", file_limit=limit))
    assert "cannot write" in line and "resume" in line
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 2 and len(trials) < 30  # the stored trials are kept; the study stopped early
    assert sum(t.state == TrialState.FAIL for t in trials) <= 1  # at the first failed write, not after each

    more = len(trials) + 1
    resumed = _tune(config, url, tmp_path, data_dir, f"--study.n_trials={more}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = optuna.load_study(study_name="s", storage=url).get_trials()
    assert len(after) == more and sum(t.state == TrialState.COMPLETE for t in after) == len(done) + 1


def test_a_read_only_storage_is_one_line_and_left_as_it_was(tmp_path, data_dir):
    config = write_config(tmp_path, study={"n_trials": 1, "workers": 1})
    db = tmp_path / "study.db"
    optuna.create_study(study_name="other", storage=f"sqlite:///{db}")  # a database with no table to spare
    before = db.read_bytes()
    done = _tune(config, f"sqlite:///file:{db}?mode=ro&uri=true", tmp_path, data_dir)
    assert "read-only" in _one_error_line(done) and done.stderr.count("\n") == 1
    assert db.read_bytes() == before


def test_a_full_disk_stops_population_based_training_in_one_line(tmp_path, data_dir):
    """The same for `study.method: pbt`, whose segments save checkpoints: the first write past the limit (here
    the first segment's checkpoint, 9 MB, against a 2 MB limit) ends the run in one line instead of failing every
    later segment."""
    population = {"size": 2, "interval": 0.25, "quantile": 0.5}
    config = write_config(
        tmp_path,
        model={"init_args": {"hidden": 1500}},  # 2.3 M parameters: a 9 MB checkpoint
        trainer={"max_epochs": 8},
        study={"method": "pbt", "population": population, "value": "last", "workers": 1},
    )
    url = f"sqlite:///{tmp_path / 'study.db'}"
    line = _one_error_line(_tune(config, url, tmp_path, data_dir, file_limit=2_000_000))
    assert "cannot write" in line and "a file grew past the size limit" in line, line
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert sum(t.state == TrialState.FAIL for t in trials) <= 1


def test_failing_stale_trials_prints_no_experimental_warning(tmp_path):
    """`tune` fails a killed process's trials while it waits for them: Optuna's heartbeat API is experimental
    and warned on every call, a line in the middle of the user's output."""
    import warnings

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1)
    study = optuna.create_study(storage=storage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records.fail_stale(study)
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
