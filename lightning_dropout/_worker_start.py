"""The first code a spawned worker process runs (the target :mod:`multiprocessing` unpickles), kept free of
heavy imports: a Ctrl-C reaches every process of the terminal's process group, and a worker still importing
torch, Lightning and Optuna when it lands would print a ``KeyboardInterrupt`` traceback. Until its target is
imported, Ctrl-C ends the worker quietly (exit 130: the parent records the study's state and says so once);
then the target runs with Python's own handler back. ``tune`` starts its workers here with the target
``lightning_dropout.tune.workers:worker_main``.

Before this code runs, the new interpreter imports its ``site`` module and ``multiprocessing`` unpickles the
target: a Ctrl-C there would print Python's own traceback (``Fatal Python error: init_import_site``). So a
worker is started with SIGINT ignored and held (:func:`children_ignore_sigint`: an ignored signal stays ignored
across ``exec``; the held mask may or may not survive the start), and :func:`start_worker` installs its quiet
handler, then lets SIGINT through, first thing. A Ctrl-C held meanwhile lands in that handler; one that was
ignored is lost to the worker, and the parent, which got it too, sends it again
(:class:`~lightning_dropout.tune.workers.Workers`)."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["children_ignore_sigint", "start_worker"]


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started in the block begin with SIGINT ignored; this process holds a Ctrl-C that arrives
    meanwhile and gets it when the block ends. Only the main thread sets signal handlers: elsewhere the block
    changes nothing."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # Linux keeps a blocked signal pending
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _leave(signum: int, frame: Any) -> None:
    os._exit(130)  # nothing started here yet: no state to record, no traceback to print


def start_worker(target: str, *args: Any) -> None:
    """Import ``target`` (``"package.module:function"``) quietly on a Ctrl-C, then call it with ``args``."""
    signal.signal(signal.SIGINT, _leave)  # ignored until here (children_ignore_sigint)
    if hasattr(signal, "pthread_sigmask"):  # and, where the start kept the parent's mask, held: delivered now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)  # torch, Lightning, Optuna: seconds
    signal.signal(signal.SIGINT, signal.default_int_handler)
    function(*args)
