"""A user's own code: the current folder importable by every command and the processes it starts, a hint when a
class_path does not import, a warning for classes in ``__main__``, and a worker that dies reported."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import yaml
from studies import BASE

from lightning_dropout.cli import main


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """``tmp_path`` as the current folder, importable only if the CLI makes it so."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.setenv("PYTHONPATH", "")
    yield tmp_path
    sys.modules.pop("ownhelper", None)


def test_the_current_folder_is_importable_here_and_in_child_processes(user_folder):
    (user_folder / "ownhelper.py").write_text("VALUE = 42\n")
    assert main(["variants"]) == 0
    import ownhelper  # noqa: F401  (this process: sys.path, which spawned workers inherit)

    # a child started from elsewhere (a DDP rank, a trial process) finds it through the environment
    (user_folder / "elsewhere").mkdir()
    child = subprocess.run(
        [sys.executable, "-c", "import ownhelper; print(ownhelper.VALUE)"],
        cwd=user_folder / "elsewhere",
        capture_output=True,
        text=True,
        check=False,
    )
    assert child.stdout.strip() == "42", child.stderr[-2000:]


def test_a_class_path_that_does_not_import_says_how_to_fix_it(user_folder, capsys):
    config = {**BASE, "model": {"class_path": "notthere.MyNet"}}
    (user_folder / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["describe", "c.yaml"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    for text in (
        "No module named 'notthere'",
        f"current folder ({user_folder})",
        "PYTHONPATH",
        "pip install",
    ):
        assert text in lines[0]


def test_tune_study_warns_about_a_class_in_main(tmp_path, monkeypatch):
    from lightning_dropout.data import MNIST1DDataModule
    from lightning_dropout.tune import api
    from lightning_dropout.zoo import MLP

    class Stop(Exception):
        pass

    def stop(args, console=None):
        raise Stop

    monkeypatch.setattr(api, "tune", stop)  # the warning comes before the study starts
    in_main = type("ScriptNet", (MLP,), {"__module__": "__main__"})
    warns = pytest.warns(UserWarning, match=r"`model` class ScriptNet is defined in __main__.*move the class")
    with warns, pytest.raises(Stop):
        api.tune_study(
            in_main,
            MNIST1DDataModule,
            dropout=[{"name": "h", "select": {"match": "Linear"}}],
            study={"run_dir": str(tmp_path)},
        )


class _DeadProcess:
    """A spawned worker that died on start (as one re-running a script without a `__main__` guard does)."""

    exitcode = 1

    def __init__(self, target, args, name):
        pass

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass


def test_a_worker_that_dies_is_reported_with_the_workers_left(monkeypatch, caplog):
    from lightning_dropout.tune import workers

    context = types.SimpleNamespace(
        Process=_DeadProcess,
        Event=threading.Event,
        Value=lambda typecode, value, lock=True: types.SimpleNamespace(value=value, get_lock=threading.Lock),
    )
    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: context)
    # the study started from a user's script (whatever runs these tests: pytest, or an xdist worker)
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__="/home/me/study.py"))
    reported_while_running = []

    def run_worker(index, study=None):  # worker 0's trials: the report comes while they run
        for _ in range(100):
            if "workers left" in caplog.text:
                break
            time.sleep(0.05)
        reported_while_running.append("workers left" in caplog.text)

    tuner = types.SimpleNamespace(
        study_config=types.SimpleNamespace(workers=2, seeds=0, method="trials"),
        args=[],
        run_worker=run_worker,
    )
    caplog.set_level(logging.WARNING, logger="lightning_dropout.tune.workers")
    with workers.Workers(tuner, poll=0.01) as pool:  # type: ignore[arg-type]
        pool.run_trials()
    assert reported_while_running == [True]
    lines = [r.getMessage() for r in caplog.records if "workers left" in r.getMessage()]
    assert len(lines) == 1, lines  # once, however often it is checked
    assert lines[0].startswith("tune worker 1 exited with code 1; 1 of 2 workers left")
    assert '`if __name__ == "__main__":`' in lines[0]


class _StuckProcess:
    """A worker that ignores Ctrl-C: alive until terminated."""

    instances: list[_StuckProcess] = []

    def __init__(self, target, args, name):
        self.alive, self.terminated = True, False
        self.pid = 4_000_000 + len(_StuckProcess.instances)  # never a real process: os.kill is replaced
        _StuckProcess.instances.append(self)

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout=None) -> None:
        pass

    def terminate(self) -> None:
        self.terminated, self.alive = True, False

    def kill(self) -> None:
        self.alive = False


def test_a_worker_that_ignores_ctrl_c_is_terminated_instead_of_hanging_the_exit(monkeypatch):
    """Python's exit joins every live worker process: one stuck after Ctrl-C hung `tune` for good. It is now
    terminated once the wait for the workers is over."""
    from lightning_dropout.tune import workers

    context = types.SimpleNamespace(
        Process=_StuckProcess,
        Event=threading.Event,
        Value=lambda typecode, value, lock=True: types.SimpleNamespace(value=value, get_lock=threading.Lock),
    )
    monkeypatch.setattr(workers.multiprocessing, "get_context", lambda method: context)
    monkeypatch.setattr(workers.Workers, "_join", lambda self, timeout=None: None)  # the wait is over at once
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(workers.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    _StuckProcess.instances.clear()

    def run_worker(index, study=None):
        raise KeyboardInterrupt

    tuner = types.SimpleNamespace(
        study_config=types.SimpleNamespace(workers=2, seeds=0, method="trials"),
        args=[],
        run_worker=run_worker,
    )
    try:
        with workers.Workers(tuner, poll=0.01) as pool:  # type: ignore[arg-type]
            pool.run_trials()
    except KeyboardInterrupt:
        pass
    (proc,) = _StuckProcess.instances
    assert signals == [(proc.pid, signal.SIGINT)]  # the Ctrl-C sent once more, before terminating it
    assert proc.terminated and not proc.is_alive()
