"""Ctrl-C in a worker's trial loop: raised at once where that is safe, held where it is not.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Inside Optuna's own
bookkeeping that breaks things: a ``KeyboardInterrupt`` in ``_tell_with_warning`` reaches a ``finally`` that reads
a variable it never set (``UnboundLocalError``: exit 1 and a traceback instead of a clean stop), and one in a
storage write leaves a trial half-recorded. So while a worker runs Optuna's loop (:func:`held`), a Ctrl-C is
only *noted*; it is raised at the next point where stopping is safe:

- when a training starts, or at once during one (:func:`allowed` around ``Trainer.fit``: Lightning stops it
  cleanly and the trial is recorded as interrupted);
- when a trial has been told to the storage (:func:`check`, an Optuna callback);
- when the loop ends (leaving :func:`held`).

Inside a training, the storage writes of the pruning callback are held again (nested :func:`held`). Outside
any :func:`held` block, and in a thread other than the main one, nothing changes: Python's own handler raises.
A second Ctrl-C while one is held raises at once (the user insists). Knows only the standard library.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["allowed", "check", "held", "pending"]

_HOLD, _RAISE = "hold", "raise"
_modes: list[str] = []  # innermost last; empty: Python's own handler is installed


class _State:
    pending = False  # a Ctrl-C arrived while held
    previous: Any = None  # the SIGINT handler before the outermost block


_state = _State()


def _handler(signum: int, frame: Any) -> None:
    if _modes and _modes[-1] == _HOLD and not _state.pending:
        _state.pending = True
        return
    _state.pending = False
    raise KeyboardInterrupt


def pending() -> bool:
    """Whether a Ctrl-C arrived and is held."""
    return _state.pending


def _raise_if_pending() -> None:
    if _state.pending:
        _state.pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def _mode(mode: str) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread: nothing to hold here
        return
    outermost = not _modes
    if outermost:
        _state.previous = signal.signal(signal.SIGINT, _handler)
        _state.pending = False
    _modes.append(mode)
    try:
        if mode == _RAISE:
            _raise_if_pending()
        yield
    finally:
        _modes.pop()
        if outermost:
            signal.signal(signal.SIGINT, _state.previous or signal.default_int_handler)
    # left normally: a Ctrl-C held in here is raised now, where the enclosing block may stop
    if not _modes or _modes[-1] == _RAISE:
        _raise_if_pending()


def held() -> contextlib.AbstractContextManager[None]:
    """A block in which a Ctrl-C is noted, not raised (raised when the block is left, or by :func:`allowed` and
    :func:`check` inside it)."""
    return _mode(_HOLD)


def allowed() -> contextlib.AbstractContextManager[None]:
    """A block inside :func:`held` in which a Ctrl-C raises at once (one held before is raised on entry)."""
    return _mode(_RAISE)


def check(*_: Any) -> None:
    """Raise a held Ctrl-C now (usable as an Optuna callback: ``callbacks=[check]``)."""
    if threading.current_thread() is threading.main_thread():
        _raise_if_pending()
