"""Choosing the winner among candidates re-run on the same seeds, with the noise accounted for (pure Python).

After the trials, the best few plans, the baselines and the best point of the warm-start grid are re-run on the
same seeds (common random numbers): seed ``i`` of every candidate starts from the same initialization and sees
the same data order and dropout generator seed, so the difference of two candidates on one seed is mostly the
effect of the plan. Comparing such paired differences needs far fewer seeds than comparing raw means.

The winner rules (``study.winner``):

* ``one_se`` (default): the one-standard-error rule (Breiman et al. 1984; Hastie, Tibshirani & Friedman,
  *The Elements of Statistical Learning*, §7.10) on paired differences. Among the candidates whose mean paired
  difference to the best mean is within one standard error of that difference, take the one with the least
  dropout (the sum of its sites' rates; ties: the better mean). Noise alone then never buys more dropout.
* ``best_mean``: the best mean over the seeds.

A gain is reported as the mean paired difference with a two-sided 95 % Student-t confidence interval; a gain
whose interval contains 0 is "within the noise".

Example:
    >>> from lightning_dropout.plan import DropoutPlan
    >>> none = Candidate("no dropout", 0, DropoutPlan(), [0.60, 0.62, 0.61], amount=0.0)
    >>> p2 = Candidate("uniform p=0.2", 1, DropoutPlan(), [0.65, 0.66, 0.66], amount=0.4)
    >>> choose_winner([none, p2], maximize=True).label
    'uniform p=0.2'
    >>> g = paired_gain(p2, none, maximize=True)
    >>> round(g.mean, 4), g.significant
    (0.0467, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_dropout.plan import DropoutPlan

__all__ = [
    "NO_DROPOUT",
    "UNIFORM_PREFIX",
    "WINNER_RULES",
    "Candidate",
    "Comparison",
    "Gain",
    "choose_winner",
    "compare",
    "paired_gain",
    "rank_candidates",
    "references",
    "t_quantile",
]

WINNER_RULES = ("one_se", "best_mean")
NO_DROPOUT = "no dropout"  # the label of the no-dropout baseline
UNIFORM_PREFIX = "uniform p="  # the labels of the warm-start grid ("uniform p=0.2")

# two-sided 95 % quantiles of Student's t (0.975) by degrees of freedom; 1.96 beyond the table
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
    60: 2.000,
}


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (conservative between table rows)."""
    if df < 1:
        return math.nan
    below = [k for k in _T975 if k <= df]
    return _T975[max(below)] if df <= 60 else 1.96


@dataclass
class Candidate:
    """A plan re-run over the study's re-run seeds.

    Args:
        label: what the user calls it (``no dropout``, ``uniform p=0.2``, ``trial 7``).
        trial: the study trial it comes from.
        plan: its dropout plan.
        values: the trial value on each re-run seed, in seed order (NaN for a failed run).
        amount: the total dropout, for the ``one_se`` rule (the sum of the rates; the model's own dropout
            for the ``as written`` baseline).
        seeds: the seeds, in the order of ``values``.
    """

    label: str
    trial: int
    plan: DropoutPlan
    values: list[float]
    amount: float = 0.0
    seeds: list[int] | None = None

    @property
    def mean(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan

    @property
    def std(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        if len(finite) < 2:
            return 0.0
        mean = sum(finite) / len(finite)
        return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


@dataclass(frozen=True)
class Gain:
    """The paired gain of one candidate over a reference (positive: better, whatever the direction)."""

    mean: float
    stderr: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the width of the 95 % confidence interval (NaN with fewer than 2 pairs)."""
        return t_quantile(self.n - 1) * self.stderr if self.n >= 2 else math.nan

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def significant(self) -> bool:
        """Whether the 95 % interval excludes 0 (the gain is more than the noise)."""
        return self.n >= 2 and not math.isnan(self.half_width) and (self.low > 0 or self.high < 0)


def paired_gain(candidate: Candidate, reference: Candidate, maximize: bool) -> Gain:
    """The mean over seeds of ``candidate - reference`` (``reference - candidate`` when minimizing), seed by
    seed; seeds where either run failed are left out."""
    sign = 1.0 if maximize else -1.0
    diffs = [
        sign * (a - b)
        for a, b in zip(candidate.values, reference.values, strict=False)
        if not (math.isnan(a) or math.isnan(b))
    ]
    if not diffs:
        return Gain(math.nan, math.nan, 0)
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return Gain(mean, math.nan, len(diffs))
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return Gain(mean, math.sqrt(var / len(diffs)), len(diffs))


def rank_candidates(candidates: Sequence[Candidate], maximize: bool) -> list[Candidate]:
    """Best mean first; candidates without a finite value last."""
    return sorted(candidates, key=lambda c: (math.isnan(c.mean), -c.mean if maximize else c.mean))


def choose_winner(candidates: Sequence[Candidate], maximize: bool, rule: str = "one_se") -> Candidate:
    """The winner under ``rule`` (see the module docstring); ``candidates`` must not be empty."""
    if rule not in WINNER_RULES:
        raise ValueError(f"`rule` must be one of {list(WINNER_RULES)}, but got {rule!r}.")
    if not candidates:
        raise ValueError("`candidates` must not be empty.")
    ranked = rank_candidates(candidates, maximize)
    best = ranked[0]
    if rule == "best_mean" or math.isnan(best.mean):
        return best
    close = []
    for c in ranked:
        gain = paired_gain(c, best, maximize)
        if c is best or (gain.n >= 2 and gain.mean + gain.stderr >= 0):
            close.append(c)
    # least dropout; among equals the better mean (ranked order is kept by the stable sort)
    return min(close, key=lambda c: c.amount)


@dataclass(frozen=True)
class Comparison:
    """One row of the results table: a candidate, whether it won, and its paired gains over the references."""

    candidate: Candidate
    winner: bool
    vs_none: Gain | None
    vs_uniform: Gain | None

    @staticmethod
    def format(gain: Gain | None) -> str:
        """``+0.0275 ± 0.0121 *`` (mean ± half-width of the 95 % interval, ``*``: beyond the noise), ``-``."""
        if gain is None or math.isnan(gain.mean):
            return "-"
        if gain.n < 2:
            return f"{gain.mean:+.4f}"
        return f"{gain.mean:+.4f} ± {gain.half_width:.4f}" + (" *" if gain.significant else "")


def references(ranked: Sequence[Candidate]) -> tuple[Candidate | None, Candidate | None]:
    """The no-dropout baseline and the best uniform (warm-start) candidate of a ranked list, when present."""
    none = next((c for c in ranked if c.label == NO_DROPOUT), None)
    uniform = next((c for c in ranked if c.label.startswith(UNIFORM_PREFIX)), None)
    return none, uniform


def compare(candidates: Sequence[Candidate], maximize: bool, rule: str = "one_se") -> list[Comparison]:
    """Every candidate, best mean first, with its paired gains over no dropout and the best uniform rate."""
    ranked = rank_candidates(candidates, maximize)
    chosen = choose_winner(ranked, maximize, rule)
    none, uniform = references(ranked)
    return [
        Comparison(
            c,
            c is chosen,
            paired_gain(c, none, maximize) if none is not None and c is not none else None,
            paired_gain(c, uniform, maximize) if uniform is not None and c is not uniform else None,
        )
        for c in ranked
    ]
