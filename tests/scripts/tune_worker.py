"""Helpers for tests/test_tune_storage.py (importable as ``tune_worker`` with ``tests/scripts`` on the path).

``python tune_worker.py CONFIG [overrides]`` runs ``lightning-dropout tune CONFIG [overrides]`` in its own
process, as a user would; ``$TUNE_TEST_HEARTBEAT_INTERVAL`` (seconds) replaces the storage heartbeat interval
first, so a killed worker's trial goes stale in seconds rather than the real 20 s.

:class:`PidRecorder` is a trainer callback the tests add through ``--trainer.callbacks``: it stores the id of
the process running each trial on the trial (user attribute ``worker_pid``), and can hold each process's first
trial until ``parties`` processes have started one, so a multi-worker study provably runs in parallel.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

PID_ATTR = "worker_pid"


class PidRecorder(Callback):
    """Record ``os.getpid()`` on the trial; optionally wait for ``parties`` processes (files in ``barrier_dir``)."""

    def __init__(self, barrier_dir: str | None = None, parties: int = 1, timeout: float = 120.0) -> None:
        self.barrier_dir = barrier_dir
        self.parties = parties
        self.timeout = timeout

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightning_dropout.tune.pruning import TrialPruning

        pid = os.getpid()
        for callback in trainer.callbacks:
            if isinstance(callback, TrialPruning) and callback.trial is not None:
                callback.trial.set_user_attr(PID_ATTR, pid)
        if self.barrier_dir is None:
            return
        barrier = Path(self.barrier_dir)
        barrier.mkdir(parents=True, exist_ok=True)
        (barrier / str(pid)).touch()
        deadline = time.monotonic() + self.timeout
        while len(list(barrier.iterdir())) < self.parties and time.monotonic() < deadline:
            time.sleep(0.1)


def main(argv: list[str]) -> int:
    interval = os.environ.get("TUNE_TEST_HEARTBEAT_INTERVAL")
    if interval:
        from lightning_dropout.tune import records

        records.HEARTBEAT_INTERVAL = int(interval)
    from lightning_dropout.cli import main as cli_main

    return cli_main(["tune", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
