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

from lightning_dropout.errors import DropoutConfigError, check_number

__all__ = [
    "SCHEDULES",
    "Constant",
    "Cosine",
    "Curriculum",
    "EarlyDropout",
    "LateDropout",
    "Linear",
    "Schedule",
    "make_schedule",
]

_UNITS = ("step", "epoch")


class Schedule:
    """Base class: subclasses take their settings as keyword arguments and implement :meth:`factor`.

    Plain classes (not dataclasses) so that LightningCLI/jsonargparse accepts any subclass by ``class_path``.

    Args:
        unit: ``"epoch"`` (evaluated at each epoch start) or ``"step"`` (before each optimizer step).
    """

    def __init__(self, unit: str = "epoch") -> None:
        if unit not in _UNITS:
            raise DropoutConfigError(f"`unit` must be one of {list(_UNITS)}, but got {unit=!r}.")
        self.unit = unit

    def _fields(self) -> dict[str, object]:
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._fields().items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), tuple(self._fields().items())))

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
    check_number(value, name, inclusive=True, or_none="None")


def _check_cutoff(cutoff: float) -> None:
    check_number(cutoff, "cutoff")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise DropoutConfigError(
            f"`{name}` must satisfy 0 <= {name} <= 1 (a fraction of p), but got {name}={value!r}."
        )


class Constant(Schedule):
    """The planned rate throughout."""

    def factor(self, t: float, total: float | None) -> float:
        return 1.0


class _Ramp(Schedule):
    """From ``start * p`` to ``end * p`` over ``duration`` units (default: the whole run), then ``end * p``."""

    def __init__(self, start: float, end: float, duration: float | None, unit: str) -> None:
        super().__init__(unit)
        _check_unit_interval("start", start)
        _check_unit_interval("end", end)
        _check_nonneg("duration", duration)
        self.start, self.end, self.duration = float(start), float(end), duration

    def _progress(self, t: float, total: float | None) -> float:
        return min(t / self._span(self.duration, total), 1.0)


class Linear(_Ramp):
    """Linear from ``start * p`` to ``end * p`` over ``duration`` units (default: the whole run)."""

    def __init__(
        self, start: float = 0.0, end: float = 1.0, duration: float | None = None, unit: str = "epoch"
    ) -> None:
        super().__init__(start, end, duration, unit)

    def factor(self, t: float, total: float | None) -> float:
        return self.start + (self.end - self.start) * self._progress(t, total)


class Cosine(_Ramp):
    """Half-cosine from ``start * p`` to ``end * p`` over ``duration`` units (default: the whole run)."""

    def __init__(
        self, start: float = 1.0, end: float = 0.0, duration: float | None = None, unit: str = "epoch"
    ) -> None:
        super().__init__(start, end, duration, unit)

    def factor(self, t: float, total: float | None) -> float:
        cos = math.cos(math.pi * self._progress(t, total))
        return self.end + (self.start - self.end) * 0.5 * (1.0 + cos)


_EARLY_MODES = ("constant", "linear")


class EarlyDropout(Schedule):
    """Dropout on for the first ``cutoff`` units, then off (Liu et al., ICML 2023)."""

    def __init__(self, cutoff: float, mode: str = "constant", unit: str = "epoch") -> None:
        super().__init__(unit)
        _check_cutoff(cutoff)
        if mode not in _EARLY_MODES:
            raise DropoutConfigError(f"`mode` must be one of {list(_EARLY_MODES)}, but got {mode=!r}.")
        self.cutoff, self.mode = cutoff, mode

    def factor(self, t: float, total: float | None) -> float:
        if t >= self.cutoff:
            return 0.0
        return 1.0 if self.mode == "constant" else 1.0 - t / self.cutoff


class LateDropout(Schedule):
    """Dropout off for the first ``cutoff`` units, then on (Liu et al., ICML 2023)."""

    def __init__(self, cutoff: float, unit: str = "epoch") -> None:
        super().__init__(unit)
        _check_cutoff(cutoff)
        self.cutoff = cutoff

    def factor(self, t: float, total: float | None) -> float:
        return 1.0 if t >= self.cutoff else 0.0


class Curriculum(Schedule):
    """``p * (1 - exp(-gamma * t))`` (Morerio et al., ICCV 2017); ``gamma=None`` uses ``10 / total``, so the
    rate is within 0.005% of ``p`` by the end of the run, as the paper suggests."""

    def __init__(self, gamma: float | None = None, unit: str = "epoch") -> None:
        super().__init__(unit)
        check_number(gamma, "gamma", or_none="None")
        self.gamma = gamma

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
