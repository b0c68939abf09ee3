"""The first code a spawned worker process runs (the target :mod:`multiprocessing` unpickles), kept free of
heavy imports: a Ctrl-C reaches every process of the terminal's process group, and a worker still importing
torch, Lightning and Optuna when it lands would print a ``KeyboardInterrupt`` traceback. Until its target is
imported, Ctrl-C ends the worker quietly (exit 130: the parent records the study's state and says so once);
then the target runs with Python's own handler back. ``tune`` starts its workers here with the target
``lightning_dropout.tune.workers:worker_main``."""

from __future__ import annotations

import importlib
import os
import signal
from typing import Any

__all__ = ["start_worker"]


def _leave(signum: int, frame: Any) -> None:
    os._exit(130)  # nothing started here yet: no state to record, no traceback to print


def start_worker(target: str, *args: Any) -> None:
    """Import ``target`` (``"package.module:function"``) quietly on a Ctrl-C, then call it with ``args``."""
    signal.signal(signal.SIGINT, _leave)
    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)  # torch, Lightning, Optuna: seconds
    signal.signal(signal.SIGINT, signal.default_int_handler)
    function(*args)
