"""The first code a spawned ``tune`` worker runs (the target :mod:`multiprocessing` unpickles), kept free of
heavy imports: a Ctrl-C reaches every process of the terminal's process group, and a worker still importing
torch, Lightning and Optuna when it lands would print a ``KeyboardInterrupt`` traceback. Until the imports are
done, Ctrl-C ends the worker quietly (exit 130: the ``tune`` process records the study's state and says so
once); then :func:`lightning_dropout.tune.workers.worker_main` runs with Python's own handler back."""

from __future__ import annotations

import os
import signal
from typing import Any

__all__ = ["start_worker"]


def _leave(signum: int, frame: Any) -> None:
    os._exit(130)  # nothing of the study started here yet: no state to record, no traceback to print


def start_worker(*args: Any) -> None:
    """Run :func:`~lightning_dropout.tune.workers.worker_main` with ``args``, quiet on a Ctrl-C at start-up."""
    signal.signal(signal.SIGINT, _leave)
    from lightning_dropout.tune.workers import worker_main  # torch, Lightning, Optuna: seconds

    signal.signal(signal.SIGINT, signal.default_int_handler)
    worker_main(*args)
