"""A trial's value from its validation curve: the estimators of ``study.value`` (pure Python).

One training run gives one noisy curve: a value after every validation. Taking its single best point adds an
upward bias to the seed noise (the maximum of many noisy points), and picking the best of many trials by it
compounds the two. The estimators here summarize the curve with less noise:

* ``best``: the best value (the classic choice; the most optimistic).
* ``window``: the mean of ``window`` consecutive values centred on the best one (shifted inwards at the ends).
* ``ema``: the best value of the exponential moving average with smoothing ``2 / (window + 1)``.
* ``tail``: the mean of the last ``window`` values.
* ``last``: the last value.

``benchmarks/estimators.py`` measures how well each ranks configurations by their mean test accuracy on fresh
seeds; the default of ``study.value`` follows that measurement (see the tuning guide).

Example:
    >>> curve = [0.50, 0.61, 0.58, 0.66, 0.60, 0.59]
    >>> trial_value(curve, "best", maximize=True)
    0.66
    >>> round(trial_value(curve, "window", maximize=True, window=3), 4)
    0.6133
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_dropout.errors import DropoutConfigError, check_int

__all__ = ["ESTIMATORS", "best_index", "trial_value"]

ESTIMATORS = ("best", "window", "ema", "tail", "last")


def best_index(values: Sequence[float], maximize: bool) -> int | None:
    """The index of the best finite value (the first on ties), or ``None`` when there is none."""
    finite = [(v, i) for i, v in enumerate(values) if not math.isnan(v)]
    if not finite:
        return None
    best = max(finite, key=lambda x: (x[0], -x[1])) if maximize else min(finite, key=lambda x: (x[0], x[1]))
    return best[1]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _ema(values: Sequence[float], alpha: float) -> list[float]:
    out: list[float] = []
    for v in values:
        if math.isnan(v):
            out.append(out[-1] if out else math.nan)
        elif not out or math.isnan(out[-1]):
            out.append(v)
        else:
            out.append(alpha * v + (1 - alpha) * out[-1])
    return out


def trial_value(values: Sequence[float], estimator: str, maximize: bool, window: int = 5) -> float:
    """Summarize one validation curve into a trial value (NaN when the curve has no finite value).

    Args:
        values: the monitored metric after each validation, in order.
        estimator: one of :data:`ESTIMATORS`.
        maximize: whether larger values are better.
        window: the number of validations averaged by ``window`` and ``tail``, and the span of ``ema``.
    """
    if estimator not in ESTIMATORS:
        raise DropoutConfigError(f"`estimator` must be one of {list(ESTIMATORS)}, but got {estimator!r}.")
    check_int(window, "window")
    index = best_index(values, maximize)
    if index is None:
        return math.nan
    if estimator == "best":
        return values[index]
    if estimator == "last":
        return values[-1]
    if estimator == "tail":
        return _mean(values[-window:])
    if estimator == "window":
        start = min(max(0, index - window // 2), max(0, len(values) - window))
        return _mean(values[start : start + window])
    smoothed = _ema(values, 2 / (window + 1))
    return smoothed[best_index(smoothed, maximize) or 0]
