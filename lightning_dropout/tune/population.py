"""Population-based training over the dropout rates: the settings and the decisions (pure Python).

PBT (Jaderberg et al. 2017, "Population Based Training of Neural Networks") trains ``size`` members side by
side. Training is cut into segments of ``interval`` x ``max_epochs`` epochs; after every segment (a
*generation*) the members are ranked by their segment's value, and each member in the bottom ``quantile``
*exploits* one in the top ``quantile`` (it continues from a copy of that member's weights and optimizer state,
with its rates) and *explores* (each rate is multiplied by a ``perturb`` factor, or with probability
``resample_probability`` drawn afresh from its range, then clipped into the range). Every decision is drawn
from a generator seeded with the study's seed and the generation, so any process that makes it makes the same
one. :mod:`lightning_dropout.tune.pbt` runs the segments as Optuna trials; this module holds what needs neither
Optuna nor Lightning.

A *dimension* is what one rate is searched for: a search group (``hidden``), or one site of a ``per_layer``
group (``hidden/fc1``), as in the Optuna parameter names of :mod:`~lightning_dropout.tune.space`.

Example:
    >>> cfg = PopulationConfig(size=4, interval=0.3)
    >>> segments(cfg, max_epochs=10)
    [(0, 3), (3, 6), (6, 9), (9, 10)]
    >>> population_size(9.6)
    10
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_dropout.errors import DropoutConfigError, check_int, closest

__all__ = [
    "DEFAULT_POPULATION_SIZE",
    "Choice",
    "PopulationConfig",
    "RateRange",
    "exploit_explore",
    "initial_rates",
    "lineage_schedule",
    "population_size",
    "segments",
]

DEFAULT_POPULATION_SIZE = 4


def population_size(budget: float | None) -> int:
    """The population of a study with a compute budget of ``budget`` trainings: a PBT study costs ``size``
    trainings (each member trains ``max_epochs`` epochs), so ``round(budget)``, at least 2 (one member alone
    has nobody to copy); :data:`DEFAULT_POPULATION_SIZE` without a budget."""
    if budget is None:
        return DEFAULT_POPULATION_SIZE
    return max(2, round(budget))


@dataclass
class PopulationConfig:
    """``study.population``: the settings of population-based training (``study.method: pbt``).

    Args:
        size: the number of members trained side by side (the study costs ``size`` trainings).
        interval: the epochs between two exploit steps, as a share of ``trainer.max_epochs`` (``0 < interval <=
            1``): segments of ``max(1, round(max_epochs * interval))`` epochs.
        quantile: the share of members that copy (the bottom) and are copied (the top), ``0 < quantile <= 0.5``;
            at least one member each.
        resample_probability: the chance that an exploring member's rate is drawn afresh from its range instead
            of perturbed.
        perturb: the factors a perturbed rate is multiplied by (one drawn per rate), each > 0.
    """

    size: int = DEFAULT_POPULATION_SIZE
    interval: float = 0.1
    quantile: float = 0.25
    resample_probability: float = 0.25
    perturb: list[float] = field(default_factory=lambda: [0.8, 1.2])

    def __post_init__(self) -> None:
        check_int(self.size, "size", 2, key="study.population.size")
        for key, low, high, low_open in (
            ("interval", 0.0, 1.0, True),
            ("quantile", 0.0, 0.5, True),
            ("resample_probability", 0.0, 1.0, False),
        ):
            value = getattr(self, key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (low < value <= high if low_open else low <= value <= high)
            if not ok:
                rule = f"{low:g} {'<' if low_open else '<='} {key} <= {high:g}"
                raise DropoutConfigError(
                    f"`study.population.{key}` must satisfy {rule}, but got {key}={value!r}."
                )
            setattr(self, key, float(value))
        factors = self.perturb
        if (
            not isinstance(factors, (list, tuple))
            or not factors
            or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in factors)
        ):
            raise DropoutConfigError(
                f"`study.population.perturb` must be a non-empty list of factors > 0, but got perturb={factors!r}."
            )
        self.perturb = [float(f) for f in factors]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> PopulationConfig:
        """``study.population`` as written (a mapping; unknown keys are refused with the nearest known ones)."""
        if data is None:
            return cls()
        if isinstance(data, PopulationConfig):
            return data
        if not isinstance(data, Mapping):
            raise DropoutConfigError(
                f"`study.population` must be a mapping with the keys {_KEYS}, but got {data!r}."
            )
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            hint = {k: closest(str(k), _KEYS, 1) for k in unknown}
            raise DropoutConfigError(
                f"`study.population` takes the keys {_KEYS}, but got unknown {unknown} (nearest: {hint})."
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def segment_epochs(self, max_epochs: int) -> int:
        """The epochs of one segment: ``max(1, round(max_epochs * interval))``."""
        return max(1, round(max_epochs * self.interval))


_KEYS = ["size", "interval", "quantile", "resample_probability", "perturb"]


def segments(cfg: PopulationConfig, max_epochs: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` epochs of every generation's segment (the last may be shorter)."""
    step = cfg.segment_epochs(max_epochs)
    return [(start, min(start + step, max_epochs)) for start in range(0, max_epochs, step)]


@dataclass(frozen=True)
class RateRange:
    """The range of one dimension's rate (a search group's ``p``, and whether it is sampled on a log scale)."""

    low: float
    high: float
    log: bool = False

    def clip(self, rate: float) -> float:
        return min(max(rate, self.low), self.high)

    def sample(self, rng: random.Random) -> float:
        if self.low == self.high:
            return self.low
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)


def _rng(seed: int, *parts: object) -> random.Random:
    # a str seed is hashed with SHA-512 by `random`: the same stream in every process (no PYTHONHASHSEED)
    return random.Random(":".join(str(p) for p in ("pbt", seed, *parts)))


def initial_rates(ranges: Mapping[str, RateRange], member: int, seed: int) -> dict[str, float]:
    """Member ``member``'s rates in generation 0: each dimension drawn from its range (log-uniform for a log
    range), from a stream seeded with ``seed`` and the member."""
    rng = _rng(seed, "init", member)
    return {dim: r.sample(rng) for dim, r in ranges.items()}


@dataclass(frozen=True)
class Choice:
    """What a member does in the next generation: continue from ``source``'s checkpoint (itself unless it
    exploits) with ``rates``."""

    source: int
    rates: dict[str, float]

    def copies(self, member: int) -> bool:
        return self.source != member


def exploit_explore(
    values: Sequence[float | None],
    rates: Sequence[Mapping[str, float]],
    ranges: Mapping[str, RateRange],
    cfg: PopulationConfig,
    maximize: bool,
    seed: int,
    generation: int,
) -> list[Choice]:
    """The members' choices for ``generation`` from the values and rates of the one before.

    ``values[m]`` is member ``m``'s segment value (``None`` when its segment failed: it counts as the worst and
    always exploits). The ``ceil(quantile * size)`` worst (at most half) copy a member drawn from as many best
    ones, then explore; the others keep their checkpoint and rates. Ties rank the lower member first."""
    n = len(values)
    if n != len(rates):
        raise ValueError(f"one value and one set of rates per member, but got {n} and {len(rates)}.")
    alive = [m for m in range(n) if values[m] is not None and not math.isnan(float(values[m]))]  # type: ignore[arg-type]
    if not alive:
        raise ValueError("no member of the generation has a value: the population cannot go on.")
    sign = -1.0 if maximize else 1.0
    ranked = sorted(alive, key=lambda m: (sign * float(values[m]), m))  # type: ignore[arg-type]  # best first
    cut = min(max(1, math.ceil(cfg.quantile * n)), n // 2)
    top = ranked[:cut]
    bottom = set(ranked[-cut:]) | (set(range(n)) - set(alive))
    bottom -= set(top)
    rng = _rng(seed, "generation", generation)
    out: list[Choice] = []
    for m in range(n):
        if m not in bottom:
            out.append(Choice(m, dict(rates[m])))
            continue
        source = top[rng.randrange(len(top))]
        new: dict[str, float] = {}
        for dim, rate in rates[source].items():
            span = ranges[dim]
            if rng.random() < cfg.resample_probability:
                new[dim] = span.sample(rng)
            else:
                new[dim] = span.clip(rate * cfg.perturb[rng.randrange(len(cfg.perturb))])
        out.append(Choice(source, new))
    return out


def lineage_schedule(
    steps: Sequence[tuple[int, Mapping[str, float]]],
) -> dict[str, list[tuple[int, float]]]:
    """Per dimension, the piecewise-constant rates a member followed: ``steps`` are ``(start epoch, rates)`` of
    each segment of its lineage in order; consecutive equal rates are merged.

    >>> lineage_schedule([(0, {"h": 0.2}), (2, {"h": 0.2}), (4, {"h": 0.3})])
    {'h': [(0, 0.2), (4, 0.3)]}
    """
    out: dict[str, list[tuple[int, float]]] = {}
    for start, rates in steps:
        for dim, rate in rates.items():
            line = out.setdefault(dim, [])
            if not line or line[-1][1] != rate:
                line.append((start, float(rate)))
    return out
