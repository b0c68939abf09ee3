"""DropoutPlan: the serializable answer to "which layer gets which dropout" (torch only).

A plan is an ordered list of :class:`Site` entries. It names modules by their qualified names, so the same
plan gives the same injection in any process (every DDP rank builds the same module tree) and round-trips
through YAML unchanged. Rules (see :mod:`lightning_dropout.injection`) are resolved against a model into a
plan; the tuner writes plans; the callback and ``lightning-dropout fit`` apply them.

Example:
    >>> plan = DropoutPlan([Site("net.0", "output", "standard", 0.2)])
    >>> DropoutPlan.from_yaml(plan.to_yaml()) == plan
    True
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_dropout._yaml import load_yaml
from lightning_dropout.errors import DropoutConfigError, check_rate, closest
from lightning_dropout.variants import get_variant

__all__ = ["WHERE", "DropoutPlan", "Site", "as_plan"]

WHERE = ("output", "input", "replace", "attribute", "weight")
"""Where a site acts on its target module:

* ``output``: dropout on the module's output (for recurrent modules: on the output sequence);
* ``input``: dropout on the module's first positional input;
* ``replace``: the target *is* an existing dropout module (or placeholder), swapped for the variant;
* ``attribute``: the float ``dropout`` of ``nn.MultiheadAttention`` (attention weights) or of a stacked
  ``nn.RNN/LSTM/GRU`` (between layers), set to ``p``; or, with a target ``"<module>.<attribute>"``, a float rate
  the module applies functionally (Hugging Face BART's ``dropout``, timm's ``drop_rate``; variant ``standard``);
* ``weight``: DropConnect on the module's weights.
"""

_SITE_KEYS = ("target", "where", "variant", "p", "params", "rates")


@dataclass(frozen=True)
class Site:
    """One dropout site.

    Args:
        target: qualified name of the module (as in ``model.named_modules()``; ``""`` is the root).
        where: one of :data:`WHERE`.
        variant: a registered variant name (see :func:`~lightning_dropout.variants.variant_names`).
        p: the rate, ``0 <= p < 1`` (for ``concrete``: the initial rate).
        params: the variant's own parameters, e.g. ``{"block_size": 5}``.
        rates: an optional piecewise-constant rate schedule over epochs, ``((epoch, rate), ...)`` with strictly
            increasing epochs, the first 0: the rate from that epoch on (``DropoutInjector`` sets it at each
            epoch start). ``p`` is the rate of epoch 0 (taken from the schedule when a mapping omits it).
            Population-based training writes the schedule its best member followed this way.
    """

    target: str
    where: str
    variant: str
    p: float
    params: Mapping[str, Any] = field(default_factory=dict)
    rates: tuple[tuple[int, float], ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, str):
            raise DropoutConfigError(f"`target` must be a module name (str), but got target={self.target!r}.")
        if self.where not in WHERE:
            raise DropoutConfigError(f"`where` must be one of {list(WHERE)}, but got where={self.where!r}.")
        # the rate and the parameters checked once, here, without building the module (apply_plan builds it)
        p, params = get_variant(self.variant).check_params(self.p, self.params)
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "params", params)
        if self.rates is not None:
            object.__setattr__(self, "rates", _check_rates(self.rates, self.p, self.variant))

    @classmethod
    def checked(cls, target: str, where: str, variant: str, p: float, params: Mapping[str, Any]) -> Site:
        """A site built from values already checked for ``variant`` (``p`` and ``params`` as
        :meth:`~lightning_dropout.variants.DropoutVariant.check_params` returned them, ``where`` one of
        :data:`WHERE`): the injection engine's sites from a :class:`~lightning_dropout.Rule`, which checked its
        rate and parameters once for all the sites it selects. Not checked again."""
        site = object.__new__(cls)
        for name, value in zip(_SITE_KEYS, (target, where, variant, p, dict(params), None), strict=True):
            object.__setattr__(site, name, value)
        return site

    def scaled(self, factor: float) -> Site:
        """This site with its rate multiplied by ``factor`` in ``[0, 1]`` (depth scaling). A rate in ``(0, p]``
        stays valid for every variant, so it is not checked again; a rate of 0 is (``concrete`` refuses it)."""
        if not 0.0 <= factor <= 1.0 or self.rates is not None:
            raise ValueError(
                f"scaled() takes a factor in [0, 1] of a site without a schedule, got {factor!r}"
            )
        if factor == 0.0:
            return Site(self.target, self.where, self.variant, 0.0, self.params)
        site = copy.copy(self)
        object.__setattr__(site, "p", self.p * factor)
        return site

    def rate_at(self, epoch: int) -> float:
        """The rate in ``epoch``: from the ``rates`` schedule (its last entry at or before ``epoch``), else ``p``."""
        if not self.rates:
            return self.p
        return next(rate for start, rate in reversed(self.rates) if start <= epoch)

    @property
    def key(self) -> str:
        """Unique id of the site within a plan: ``"<target>:<where>"``."""
        return f"{self.target}:{self.where}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target,
            "where": self.where,
            "variant": self.variant,
            "p": self.p,
        }
        if self.params:
            out["params"] = dict(self.params)
        if self.rates is not None:
            out["rates"] = [[start, rate] for start, rate in self.rates]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where_from: str = "site") -> Site:
        if not isinstance(data, Mapping):
            raise DropoutConfigError(
                f"{where_from} must be a mapping with keys {list(_SITE_KEYS)}, but got {data!r}."
            )
        unknown = sorted(set(data) - set(_SITE_KEYS))
        if unknown:
            hint = {k: closest(k, _SITE_KEYS, 1) for k in unknown}
            raise DropoutConfigError(
                f"{where_from} takes the keys {list(_SITE_KEYS)}, but got unknown {unknown} (nearest: {hint})."
            )
        required = ("target", "variant") if data.get("rates") is not None else ("target", "variant", "p")
        missing = [k for k in required if k not in data]
        if missing:
            raise DropoutConfigError(f"{where_from} must give {missing}, but got {dict(data)!r}.")
        try:
            rates = _rate_pairs(data["rates"]) if data.get("rates") is not None else None
            p: Any = data["p"] if "p" in data or rates is None else rates[0][1]  # epoch 0's rate by default
            return cls(
                data["target"],
                data.get("where", "output"),
                data["variant"],
                p,
                data.get("params") or {},
                rates,
            )
        except DropoutConfigError as err:
            raise DropoutConfigError(f"{where_from}: {err}") from None

    def __hash__(self) -> int:
        params = json.dumps(self.params, sort_keys=True)
        return hash((self.target, self.where, self.variant, self.p, params, self.rates))


class _Flow(list):  # type: ignore[type-arg]
    """A list written in YAML's flow style (a rate schedule's ``[epoch, rate]`` pairs, one per line)."""


class _PlanDumper(yaml.SafeDumper):
    """``yaml.safe_dump``, with :class:`_Flow` lists on one line."""


_PlanDumper.add_representer(
    _Flow, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def _rate_pairs(rates: Any) -> tuple[tuple[Any, Any], ...]:
    """``rates`` as written (``[[epoch, rate], ...]``) as pairs, or an error naming the form."""
    if not isinstance(rates, (list, tuple)) or not rates:
        raise DropoutConfigError(
            f"`rates` must be a non-empty list of [epoch, rate] pairs, but got rates={rates!r}."
        )
    for pair in rates:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DropoutConfigError(
                f"`rates` must be a list of [epoch, rate] pairs, but got the entry {pair!r} in rates={rates!r}."
            )
    return tuple((pair[0], pair[1]) for pair in rates)


def _check_rates(rates: Any, p: float, variant: str) -> tuple[tuple[int, float], ...]:
    """A site's rate schedule, validated: epochs integers >= 0, strictly increasing, the first 0 with the rate
    ``p``; every rate ``0 <= rate < 1``; a learned-rate variant takes none."""
    pairs = _rate_pairs(rates)
    out: list[tuple[int, float]] = []
    for epoch, rate in pairs:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise DropoutConfigError(
                f"`rates` epochs must be integers >= 0, but got epoch={epoch!r} in rates={list(pairs)!r}."
            )
        if out and epoch <= out[-1][0]:
            raise DropoutConfigError(
                f"`rates` epochs must strictly increase, but {epoch} follows {out[-1][0]} in rates={list(pairs)!r}."
            )
        out.append((epoch, check_rate(rate, "rates[].rate")))
    if out[0][0] != 0 or out[0][1] != p:
        raise DropoutConfigError(
            f"`rates` must start at epoch 0 with the site's rate p={p!r}, but starts with {list(out[0])!r}."
        )
    if not get_variant(variant).schedulable:
        raise DropoutConfigError(
            f"`rates` schedules a fixed rate, but variant {variant!r} learns its rate; drop `rates` from the site."
        )
    return tuple(out)


class DropoutPlan:
    """An ordered, validated collection of :class:`Site` entries with unique keys.

    Args:
        sites: the sites; a later site with the key of an earlier one replaces it.
    """

    def __init__(self, sites: Iterable[Site] = ()) -> None:
        by_key: dict[str, Site] = {}
        for site in sites:
            if not isinstance(site, Site):
                raise DropoutConfigError(f"a plan holds Site objects, but got {site!r}.")
            by_key.pop(site.key, None)
            by_key[site.key] = site
        self._sites = tuple(by_key.values())

    @property
    def sites(self) -> tuple[Site, ...]:
        return self._sites

    def __iter__(self) -> Iterator[Site]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def __getitem__(self, key: str) -> Site:
        for site in self._sites:
            if site.key == key:
                return site
        near = closest(key, [s.key for s in self._sites])
        raise KeyError(f"no site {key!r} in the plan; nearest: {near}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DropoutPlan) and self._sites == other._sites

    def __hash__(self) -> int:
        return hash(self._sites)

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.key}={s.variant}({s.p:g})" for s in self._sites)
        return f"DropoutPlan([{inner}])"

    def with_rates(self, rates: Mapping[str, float]) -> DropoutPlan:
        """A copy with the rates of the sites named in ``rates`` (by key) replaced."""
        unknown = sorted(set(rates) - {s.key for s in self._sites})
        if unknown:
            raise DropoutConfigError(
                f"`rates` names sites not in the plan: {unknown}; the sites are "
                f"{[s.key for s in self._sites]}."
            )
        return DropoutPlan(
            Site(s.target, s.where, s.variant, rates[s.key], s.params) if s.key in rates else s
            for s in self._sites
        )

    def with_schedules(self, schedules: Mapping[str, Sequence[tuple[int, float]]]) -> DropoutPlan:
        """A copy in which each site named in ``schedules`` (by key) follows the piecewise-constant rate schedule
        given there (``[(epoch, rate), ...]``, the first at epoch 0; see :attr:`Site.rates`); a schedule of one
        entry is a constant rate."""
        unknown = sorted(set(schedules) - {s.key for s in self._sites})
        if unknown:
            raise DropoutConfigError(
                f"`schedules` names sites not in the plan: {unknown}; the sites are "
                f"{[s.key for s in self._sites]}."
            )
        out = []
        for s in self._sites:
            steps = [(int(e), float(r)) for e, r in schedules.get(s.key, ())]
            if not steps:
                out.append(s)
                continue
            rates = tuple(steps) if len(steps) > 1 else None
            out.append(Site(s.target, s.where, s.variant, steps[0][1], s.params, rates))
        return DropoutPlan(out)

    @property
    def scheduled(self) -> bool:
        """Whether a site of the plan follows a rate schedule (:attr:`Site.rates`)."""
        return any(s.rates for s in self._sites)

    # -- serialization -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.to_dict() for s in self._sites]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where_from: str = "plan") -> DropoutPlan:
        if data is None:
            return cls()
        if not isinstance(data, Mapping) or set(data) - {"sites"}:
            raise DropoutConfigError(
                f"{where_from} must be a mapping with the single key 'sites', but got {data!r}."
            )
        sites = data.get("sites") or []
        if not isinstance(sites, list):
            raise DropoutConfigError(f"{where_from}.sites must be a list, but got {sites!r}.")
        return cls(Site.from_dict(s, f"{where_from}.sites[{i}]") for i, s in enumerate(sites))

    def to_yaml(self) -> str:
        data = self.to_dict()
        for site in data["sites"]:
            if "rates" in site:
                site["rates"] = [_Flow(pair) for pair in site["rates"]]
        return yaml.dump(data, Dumper=_PlanDumper, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where_from: str = "plan") -> DropoutPlan:
        if not isinstance(text, str):
            raise DropoutConfigError(
                f"{where_from} must be given as YAML text (str), but got {text!r} ({type(text).__name__}); "
                "use DropoutPlan.load(path) for a file."
            )
        try:
            data = load_yaml(text)  # the safe loader, strict on repeated keys and alias bombs
        except DropoutConfigError as err:
            raise DropoutConfigError(f"{where_from}: {err}") from None
        except yaml.YAMLError as err:
            raise DropoutConfigError(f"{where_from} is not valid YAML: {err}") from None
        return cls.from_dict(data, where_from)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def load(cls, path: str | Path) -> DropoutPlan:
        path = Path(path)
        if not path.is_file():
            raise DropoutConfigError(f"a plan file must exist, but got path={str(path)!r}.")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise DropoutConfigError(
                f"{path}: a plan file must be UTF-8 YAML text, but byte {err.object[err.start]:#04x} at offset "
                f"{err.start} is not UTF-8 (a binary file?)."
            ) from None
        return cls.from_yaml(text, where_from=str(path))

    def digest(self) -> str:
        """A short hash of the canonical form: equal plans have equal digests in any process."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def as_plan(plan: DropoutPlan | str | Path | Mapping[str, Any]) -> DropoutPlan:
    """A plan given as a DropoutPlan, a path to its YAML or a mapping (as a config gives it)."""
    if isinstance(plan, DropoutPlan):
        return plan
    if isinstance(plan, (str, Path)):
        return DropoutPlan.load(plan)
    if isinstance(plan, Mapping):
        return DropoutPlan.from_dict(plan)
    raise DropoutConfigError(
        f"`plan` must be a DropoutPlan, a path to a plan YAML or a mapping, but got {plan!r}."
    )
