"""Dividing this machine's GPUs among the ``study.workers`` workers of one ``tune`` run.

With ``trainer.devices: d`` and ``w`` workers, worker ``i`` gets the GPUs ``devices[i*d:(i+1)*d]`` of the list
``study.devices`` (default: every visible GPU) through ``CUDA_VISIBLE_DEVICES``: the spawned workers get it in
their environment from the start, the ``tune`` process (worker 0) sets it on itself before any trial (Lightning
keeps CUDA uninitialized until a trial trains), and the process of a DDP trial and its ranks inherit it from
their worker. Each trial then sees its own GPUs as ``cuda:0`` .. ``cuda:d-1``.

``study.workers: auto`` fills the machine: ``len(devices) // d`` workers, or without GPUs the CPU cores divided
by the threads of one trial (``study.threads`` per process, ``d`` processes).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_dropout.errors import DropoutConfigError

__all__ = ["VISIBLE_ENV", "DeviceLayout", "divide", "gpu_environment", "trial_port", "visible_gpus"]

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class DeviceLayout:
    """How one ``tune`` run places its workers: ``workers`` processes, worker ``i`` on the GPUs ``sets[i]`` (a
    ``CUDA_VISIBLE_DEVICES`` value), or ``sets`` empty when the workers are not given GPUs of their own."""

    workers: int
    sets: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()

    def describe(self) -> str:
        """``GPUs 0,1 | 2,3`` (one group per worker), or ``""`` without GPU sets."""
        if not self.sets:
            return ""
        spare = f"; unused: {','.join(self.unused)}" if self.unused else ""
        return f"GPUs {' | '.join(self.sets)}{spare}"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them: its entries when it is set, else
    ``0 .. torch.cuda.device_count()-1`` (NVML's count: CUDA is not initialized)."""
    value = os.environ.get(VISIBLE_ENV)
    if value is not None:
        return [d.strip() for d in value.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _fits(n: int, per_trial: int) -> str:
    """What fits on ``n`` GPUs with trials of ``per_trial``: ``8 GPUs: 4 workers of 2``."""
    fit = n // per_trial
    if fit == 0:
        return f"{n} GPU{'s' if n != 1 else ''}: no trial of {per_trial} fits (trainer.devices at most {n})"
    return f"{n} GPU{'s' if n != 1 else ''}: {fit} worker{'s' if fit != 1 else ''} of {per_trial}"


def divide(
    devices: Sequence[str] | None,
    per_trial: int,
    workers: int | str,
    threads: int = 1,
    cores: int | None = None,
    source: str = "the GPUs of `study.devices`",
) -> DeviceLayout:
    """The layout of ``workers`` (an integer or ``"auto"``) with trials of ``per_trial`` devices on the GPUs
    ``devices`` (``None``: no GPUs to divide, the trials run on the CPU or wherever the trainer puts them).

    Example:
        >>> divide(["0", "1", "2", "3"], 2, 2).sets
        ('0,1', '2,3')
        >>> divide([str(i) for i in range(8)], 2, "auto").workers
        4
        >>> divide(None, 2, "auto", threads=1, cores=8).workers
        4
        >>> divide([str(i) for i in range(8)], 2, 5)
        Traceback (most recent call last):
        ...
        lightning_dropout.errors.DropoutConfigError: `study.workers` x `trainer.devices` must fit the GPUs of `study.devices` ([0, 1, 2, 3, 4, 5, 6, 7]), but 5 workers of 2 need 10; 8 GPUs: 4 workers of 2 (`--workers 4` or `--workers auto`).
    """
    if devices is None:
        if workers == "auto":
            free = cores if cores is not None else _cores()
            return DeviceLayout(max(1, free // max(1, threads * per_trial)))
        return DeviceLayout(int(workers))
    n = len(devices)
    fit = n // per_trial if per_trial > 0 else 0
    count = fit if workers == "auto" else int(workers)
    if fit == 0 or count > fit:
        shown = "[" + ", ".join(devices) + "]"
        need = f"{count} worker{'s' if count != 1 else ''} of {per_trial} need {count * per_trial}"
        hint = f" (`--workers {fit}` or `--workers auto`)" if fit else ""
        raise DropoutConfigError(
            f"`study.workers` x `trainer.devices` must fit {source} ({shown}), but {need}; "
            f"{_fits(n, per_trial)}{hint}."
        )
    sets = tuple(",".join(devices[i * per_trial : (i + 1) * per_trial]) for i in range(count))
    return DeviceLayout(count, sets, tuple(devices[count * per_trial :]))


@contextlib.contextmanager
def gpu_environment(value: str | None) -> Iterator[None]:
    """Set ``CUDA_VISIBLE_DEVICES`` to ``value`` in this process (what it starts inherits it) for the block; no
    change with ``None``. Restores the former value after."""
    if value is None:
        yield
        return
    before = os.environ.get(VISIBLE_ENV)
    os.environ[VISIBLE_ENV] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VISIBLE_ENV, None)
        else:
            os.environ[VISIBLE_ENV] = before


_PORTS = random.SystemRandom()


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections (Linux: ``ip_local_port_range``)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # the usual lower bound (Linux, and IANA's dynamic range starts at 49152)


def trial_port(low: int = 10000) -> int:
    """A free TCP port for a DDP trial's rendezvous (``MASTER_PORT``), below the ephemeral range.

    Lightning's own choice (bind to port 0, close, bind again once the ranks have started) is an ephemeral
    port: while the ranks of a trial start, the connections of another worker's DDP trial (gloo opens many)
    may take it, and the trial fails with EADDRINUSE. A port below the range is never taken by a connection.

    Example:
        >>> 10000 <= trial_port() < max(_ephemeral_low(), 10001)
        True
    """
    high = max(_ephemeral_low(), low + 1)
    for _ in range(100):
        port = _PORTS.randrange(low, high)  # not `random`: seed_everything seeds it alike in every worker
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: any free port
        sock.bind(("", 0))
        return int(sock.getsockname()[1])
