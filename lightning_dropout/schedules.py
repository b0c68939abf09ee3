"""Rate schedules: how a site's rate changes over training (pure Python, no torch).

A schedule maps training progress ``t`` (steps or epochs, by ``unit``) to a factor in ``[0, 1]`` that
multiplies each site's planned rate ``p``. ``DropoutInjector`` evaluates it before every step (``unit="step"``)
or epoch (``unit="epoch"``); since it is a pure function of the trainer's progress counters, a resumed run
continues the schedule where it stopped.

* :class:`Constant`: ``p`` throughout.
* :class:`Linear` / :class:`Cosine`: from ``start * p`` to ``end * p`` over ``duration`` units (default:
  the whole run), then ``end * p``.
* :class:`EarlyDropout`: ``p`` until ``cutoff``, then 0 (``mode="linear"`` falls from ``p`` to 0 by the
  cutoff). Liu, Xu, Darrell, Darrell, Mahajan. "Dropout Reduces Underfitting." ICML 2023.
* :class:`LateDropout`: 0 until ``cutoff``, then ``p`` (the same paper's "late" regime, for overfitting).
* :class:`Curriculum`: ``p * (1 - exp(-gamma * t))``: the retain probability starts at 1 and decays
  towards ``1 - p``. Morerio, Cavazza, Volpi, Vidal, Murino. "Curriculum Dropout." ICCV 2017.

Example:
    >>> EarlyDropout(cutoff=10).factor(5, total=100), EarlyDropout(cutoff=10).factor(10, total=100)
    (1.0, 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_dropout.errors import DropoutConfigError

__all__ = ["SCHEDULES", "Constant", "Cosine", "Curriculum", "EarlyDropout", "LateDropout", "Linear", "Schedule",
           "make_schedule"]

_UNITS = ("step", "epoch")


@dataclass(frozen=True)
class Schedule:
    """Base class: subclasses implement :meth:`factor`.

    Args:
        unit: ``"epoch"`` (evaluated at each epoch start) or ``"step"`` (before each optimizer step).
    """

    unit: str = "epoch"

    def __post_init__(self) -> None:
        if self.unit not in _UNITS:
            raise DropoutConfigError(f"`unit` must be one of {list(_UNITS)}, but got unit={self.unit!r}.")

    def factor(self, t: float, total: float | None) -> float:
        """The multiplier of the planned rate at progress ``t`` of ``total`` units (``None`` if unknown)."""
        raise NotImplementedError

    def _span(self, duration: float | None, total: float | None) -> float:
        span = duration if duration is not None else total
        if span is None or span <= 0:
            raise DropoutConfigError(
                f"{type(self).__name__} needs `duration` > 0 or a run of known length (max_epochs / max_steps), "
                f"but got duration={duration!r} and a run length of {total!r}."
            )
        return float(span)


def _check_nonneg(name: str, value: float | None) -> None:
    if value is not None and not value >= 0:
        raise DropoutConfigError(f"`{name}` must be >= 0, but got {name}={value!r}.")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise DropoutConfigError(f"`{name}` must satisfy 0 <= {name} <= 1 (a fraction of p), but got {name}={value!r}.")


@dataclass(frozen=True)
class Constant(Schedule):
    """The planned rate throughout."""

    def factor(self, t: float, total: float | None) -> float:
        return 1.0


@dataclass(frozen=True)
class Linear(Schedule):
    """Linear from ``start * p`` to ``end * p`` over ``duration`` units (default: the whole run)."""

    start: float = 0.0
    end: float = 1.0
    duration: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit_interval("start", self.start)
        _check_unit_interval("end", self.end)
        _check_nonneg("duration", self.duration)

    def factor(self, t: float, total: float | None) -> float:
        frac = min(t / self._span(self.duration, total), 1.0)
        return self.start + (self.end - self.start) * frac


@dataclass(frozen=True)
class Cosine(Schedule):
    """Half-cosine from ``start * p`` to ``end * p`` over ``duration`` units (default: the whole run)."""

    start: float = 1.0
    end: float = 0.0
    duration: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit_interval("start", self.start)
        _check_unit_interval("end", self.end)
        _check_nonneg("duration", self.duration)

    def factor(self, t: float, total: float | None) -> float:
        frac = min(t / self._span(self.duration, total), 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))


_EARLY_MODES = ("constant", "linear")


@dataclass(frozen=True)
class EarlyDropout(Schedule):
    """Dropout on for the first ``cutoff`` units, then off (Liu et al., ICML 2023)."""

    cutoff: float = 0.0
    mode: str = "constant"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.cutoff > 0:
            raise DropoutConfigError(f"`cutoff` must be > 0, but got cutoff={self.cutoff!r}.")
        if self.mode not in _EARLY_MODES:
            raise DropoutConfigError(f"`mode` must be one of {list(_EARLY_MODES)}, but got mode={self.mode!r}.")

    def factor(self, t: float, total: float | None) -> float:
        if t >= self.cutoff:
            return 0.0
        return 1.0 if self.mode == "constant" else 1.0 - t / self.cutoff


@dataclass(frozen=True)
class LateDropout(Schedule):
    """Dropout off for the first ``cutoff`` units, then on (Liu et al., ICML 2023)."""

    cutoff: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.cutoff > 0:
            raise DropoutConfigError(f"`cutoff` must be > 0, but got cutoff={self.cutoff!r}.")

    def factor(self, t: float, total: float | None) -> float:
        return 1.0 if t >= self.cutoff else 0.0


@dataclass(frozen=True)
class Curriculum(Schedule):
    """``p * (1 - exp(-gamma * t))`` (Morerio et al., ICCV 2017); ``gamma=None`` uses ``10 / total``, so the
    rate is within 0.005% of ``p`` by the end of the run, as the paper suggests."""

    gamma: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma is not None and not self.gamma > 0:
            raise DropoutConfigError(f"`gamma` must be > 0, but got gamma={self.gamma!r}.")

    def factor(self, t: float, total: float | None) -> float:
        gamma = self.gamma if self.gamma is not None else 10.0 / self._span(None, total)
        return 1.0 - math.exp(-gamma * t)


SCHEDULES: dict[str, type[Schedule]] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "early": EarlyDropout,
    "late": LateDropout,
    "curriculum": Curriculum,
}


def make_schedule(name: str, **kwargs: float | str | None) -> Schedule:
    """Build a schedule by name (``"early"``, ``"linear"``, ...); unknown names list the choices."""
    if name not in SCHEDULES:
        raise DropoutConfigError(f"`schedule` must be one of {sorted(SCHEDULES)}, but got {name!r}.")
    try:
        return SCHEDULES[name](**kwargs)  # type: ignore[arg-type]
    except TypeError as err:
        raise DropoutConfigError(f"schedule {name!r}: {err}") from None
