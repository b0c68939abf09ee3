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

Racing (:func:`race`, after F-race, Birattari et al. 2002): the candidates are re-run one seed per round, every
candidate still in the race getting the same seed. From ``min_seeds`` paired seeds on, a candidate whose one-sided
paired t-test against the round's leader (the best mean) says it is worse is dropped: it gets no more seeds. Each
test runs at level ``alpha / (looks * leaders)`` (Bonferroni over every round that may test and every other
candidate that may lead), so for any one candidate, the best among them included, the probability that the race
ever drops it while it is at least as good as the leader it is compared with is at most ``alpha`` (under normal
paired differences). The references (no dropout, the best grid point) are
never dropped: every gain is reported against them.

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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.plan import DropoutPlan

__all__ = [
    "NO_DROPOUT",
    "UNIFORM_PREFIX",
    "WINNER_RULES",
    "Candidate",
    "Comparison",
    "Gain",
    "Race",
    "choose_winner",
    "compare",
    "paired_gain",
    "race",
    "rank_candidates",
    "references",
    "t_quantile",
    "t_sf",
    "t_upper",
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


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom.

    Example:
        >>> round(t_sf(2.776, 4), 4)
        0.025
    """
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_upper(level: float, df: int) -> float:
    """The ``1 - level`` quantile of Student's t with ``df`` degrees of freedom (``t_sf(q, df) == level``).

    Example:
        >>> round(t_upper(0.025, 4), 3)
        2.776
    """
    if not 0.0 < level < 0.5 or df < 1:
        raise DropoutConfigError(
            f"`level` must satisfy 0 < level < 0.5 and `df` >= 1, but got {level=}, {df=}."
        )
    low, high = 0.0, 1.0
    while t_sf(high, df) > level:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_sf(mid, df) > level:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


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
    dropped_after: int | None = None  # racing dropped it after this many seeds (it is worse than the leader)

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
    """Best mean first; candidates without a finite value last, then those the race dropped."""
    return sorted(
        candidates,
        key=lambda c: (c.dropped_after is not None, math.isnan(c.mean), -c.mean if maximize else c.mean),
    )


def choose_winner(candidates: Sequence[Candidate], maximize: bool, rule: str = "one_se") -> Candidate:
    """The winner under ``rule`` (see the module docstring); ``candidates`` must not be empty."""
    if rule not in WINNER_RULES:
        raise DropoutConfigError(f"`rule` must be one of {list(WINNER_RULES)}, but got {rule!r}.")
    if not candidates:
        raise DropoutConfigError("`candidates` must not be empty.")
    # a candidate the race dropped was found worse than another one: it cannot win
    racing = [c for c in candidates if c.dropped_after is None]
    ranked = rank_candidates(racing or list(candidates), maximize)
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


@dataclass(frozen=True)
class Race:
    """The state of a race replayed from the values stored so far (:func:`race`).

    Attributes:
        rounds: the candidates of every round started, in order (round ``r`` re-runs each of them on seed ``r``);
            the last one may still be incomplete.
        dropped: the candidates dropped, with the number of seeds each had when it was dropped.
        finished: no round is left to run (every round complete, or the next would not fit the budget).
    """

    rounds: list[list[int]]
    dropped: dict[int, int]
    finished: bool

    @property
    def alive(self) -> list[int]:
        """The candidates still in the race (those of the last round, less any dropped after it)."""
        return [c for c in (self.rounds[-1] if self.rounds else []) if c not in self.dropped]

    def pending(self, values: Mapping[int, Sequence[float]]) -> list[tuple[int, int]]:
        """The (candidate, seed index) runs of the current round that have no value yet."""
        if self.finished or not self.rounds:
            return []
        r = len(self.rounds) - 1
        return [(c, r) for c in self.rounds[-1] if len(values.get(c, ())) <= r]


def _paired(a: Sequence[float], b: Sequence[float], n: int, sign: float) -> list[float]:
    return [
        sign * (x - y) for x, y in zip(a[:n], b[:n], strict=False) if not (math.isnan(x) or math.isnan(y))
    ]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def race(
    values: Mapping[int, Sequence[float]],
    order: Sequence[int],
    protected: Collection[int],
    rounds: int,
    maximize: bool,
    alpha: float = 0.05,
    min_seeds: int = 3,
    affordable: Callable[[int, int], bool] | None = None,
) -> Race:
    """Replay a race over the values stored so far (pure: the same values give the same race in every process).

    Args:
        values: each candidate's values, seed by seed (``values[c][r]``: candidate ``c`` on seed ``r``).
        order: the candidates, in a fixed order (the order of each round's runs).
        protected: candidates never dropped (the references every gain is reported against).
        rounds: the most seeds any candidate gets.
        maximize: whether larger values are better.
        alpha: the race's error rate per candidate: the probability of ever dropping a given candidate while it
            is not worse than the leader it is compared with (Bonferroni over every look and every possible
            leader); 0 never drops.
        min_seeds: the paired seeds a candidate has before it may be dropped (at least 2).
        affordable: ``affordable(runs_so_far, runs_of_next_round)``: whether the next round fits the budget; a
            round runs whole or not at all.

    Example:
        >>> vals = {0: [0.60, 0.61, 0.60], 1: [0.70, 0.71, 0.70], 2: [0.50, 0.52, 0.49]}
        >>> r = race(vals, [0, 1, 2], protected=[0], rounds=5, maximize=True, alpha=0.2)
        >>> r.dropped, r.alive, r.pending(vals)
        ({2: 3}, [0, 1], [(0, 3), (1, 3)])
    """
    if min_seeds < 2:
        raise DropoutConfigError(f"`min_seeds` must be >= 2, but got {min_seeds=}.")
    sign = 1.0 if maximize else -1.0
    looks = max(rounds - min_seeds + 1, 1)
    pairs = max(len(order) - 1, 1)
    level = alpha / (looks * pairs)
    alive = list(order)
    dropped: dict[int, int] = {}
    started: list[list[int]] = []
    spent = 0
    for r in range(rounds):
        if affordable is not None and not affordable(spent, len(alive)):
            return Race(started, dropped, True)
        started.append(list(alive))
        if any(len(values.get(c, ())) <= r for c in alive):
            return Race(started, dropped, False)
        spent += len(alive)
        n = r + 1
        if n < min_seeds or alpha <= 0 or len(alive) < 2:
            continue
        means = {c: _mean(values[c][:n]) for c in alive}
        finite = [c for c in alive if not math.isnan(means[c])]
        if not finite:
            continue
        leader = max(finite, key=lambda c: sign * means[c])
        for c in alive:
            if c == leader or c in protected:
                continue
            diffs = _paired(values[c], values[leader], n, sign)
            if len(diffs) < min_seeds:
                continue
            mean = sum(diffs) / len(diffs)
            var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
            se = math.sqrt(var / len(diffs))
            if mean + t_upper(level, len(diffs) - 1) * se < 0:  # the upper bound excludes "as good"
                dropped[c] = n
        alive = [c for c in alive if c not in dropped]
    return Race(started, dropped, True)
