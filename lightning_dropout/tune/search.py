"""The ``search:`` section: any value of the config searched beside dropout (weight decay, learning rate, batch
size, ...), given as a dotted config key and a distribution.

.. code-block:: yaml

    search:
      model.init_args.weight_decay: {low: 1.0e-5, high: 1.0e-2, log: true}
      model.init_args.lr: {low: 1.0e-3, high: 3.0e-2, log: true}
      data.init_args.batch_size: {type: int, low: 50, high: 200, step: 50}
      model.init_args.activation: {choices: [relu, gelu]}

A distribution is ``float`` (the default with ``low``/``high``), ``int`` (``type: int``, optional ``step``) or
categorical (``choices``); ``log: true`` samples on a log scale. The key is the Optuna parameter name. Every
sampled trial suggests each value (in the study process, before the model is built, so DDP ranks and re-runs
get the same values) and the trial's model, datamodule and trainer are built from the config with those values
set. Fixed trials (the baselines, the warm-start grid, enqueued plans) keep the config's own values unless an
enqueued parameter dict sets the key. The values a run used are stored on the trial (``search`` user
attribute, :data:`~lightning_dropout.tune.records.SEARCH_ATTR`), shown in HParams as ``search/<key>`` and written with the winner by ``best --config-out``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from lightning_dropout.errors import DropoutConfigError, closest
from lightning_dropout.tune.records import ENQUEUED_PARAMS_ATTR

__all__ = ["Distribution", "format_search", "parse_search", "search_values"]


_KEYS = {"type", "low", "high", "log", "step", "choices"}
_TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Distribution:
    """One searched value: ``kind`` is ``float``, ``int`` or ``categorical``."""

    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @classmethod
    def from_spec(cls, key: str, spec: Any) -> Distribution:
        where = f"`search.{key}`"
        if not isinstance(spec, Mapping):
            raise DropoutConfigError(
                f"{where} must be a mapping such as {{low: 0.0001, high: 0.01, log: true}} or {{choices: [a, b]}}, "
                f"but got {spec!r}."
            )
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise DropoutConfigError(f"{where} takes {sorted(_KEYS)}, but got unknown {unknown}.")
        kind = spec.get("type", "categorical" if "choices" in spec else "float")
        if kind not in _TYPES:
            raise DropoutConfigError(f"{where}.type must be one of {list(_TYPES)}, but got {kind!r}.")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices or set(spec) - {"type", "choices"}:
                raise DropoutConfigError(
                    f"{where}: a categorical value takes only a non-empty `choices` list, but got {dict(spec)!r}."
                )
            return cls("categorical", choices=tuple(choices))
        low, high = spec.get("low"), spec.get("high")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not (math.isfinite(float(low)) and math.isfinite(float(high)) and low <= high):  # type: ignore[arg-type,operator]
            raise DropoutConfigError(
                f"{where} needs finite numbers low <= high, but got low={low!r}, high={high!r}."
            )
        log = spec.get("log", False)
        if not isinstance(log, bool):  # YAML's 'false' is a string, and a non-empty string is true
            raise DropoutConfigError(f"{where}.log must be true or false, but got {log!r}.")
        if log and low <= 0:  # type: ignore[operator]
            raise DropoutConfigError(f"{where}: `log: true` needs low > 0, but got low={low!r}.")
        step = spec.get("step")
        if step is not None and (log or not isinstance(step, (int, float)) or step <= 0):
            raise DropoutConfigError(
                f"{where}.step must be a positive number without `log`, but got {step!r}."
            )
        if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):  # type: ignore[arg-type]
            raise DropoutConfigError(
                f"{where}: an int value needs integer low, high and step, but got {dict(spec)!r}."
            )
        return cls(kind, float(low), float(high), log, None if step is None else float(step))  # type: ignore[arg-type]

    def domain(self) -> str:
        """``[0.0001, 0.01] log``, ``int [50, 200] step 50``, ``{'relu', 'gelu'}``: as ``describe`` shows it.

        Example:
            >>> Distribution.from_spec("lr", {"low": 1e-4, "high": 1e-2, "log": True}).domain()
            '[0.0001, 0.01] log'
        """
        if self.kind == "categorical":
            return "{" + ", ".join(repr(c) for c in self.choices) + "}"
        text = f"{'int ' if self.kind == 'int' else ''}[{self.low:g}, {self.high:g}]"
        return text + (" log" if self.log else "") + (f" step {self.step:g}" if self.step is not None else "")

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


def parse_search(raw: Mapping[str, Any] | None, config: Any) -> dict[str, Distribution]:
    """The ``search:`` section, validated: each key must be a key of the parsed ``config`` (a jsonargparse
    Namespace; the nearest keys are named otherwise) outside the tuner's own sections."""
    space: dict[str, Distribution] = {}
    if not raw:
        return space
    keys = [str(k) for k in config.keys()]  # noqa: SIM118  (a Namespace iterates over its top-level keys)
    for key, spec in raw.items():
        if key.split(".")[0] in ("study", "dropout", "search"):
            raise DropoutConfigError(
                f"`search` keys name values of model, data or trainer, not of the tuner's own sections, but got {key!r}."
            )
        if key not in keys:
            raise DropoutConfigError(
                f"`search` keys must be keys of the config, but {key!r} is not; nearest: {closest(key, keys)}."
            )
        space[key] = Distribution.from_spec(key, spec)
    return space


def format_search(space: Mapping[str, Distribution]) -> str:
    """The ``search:`` section as ``describe`` previews it: each value beside dropout with its domain."""
    width = max(map(len, space), default=0)
    head = (
        f"search: {len(space)} value{'s' if len(space) != 1 else ''} beside dropout (sampled in every trial)"
    )
    return "\n".join([head, *(f"    {key.ljust(width)}  {dist.domain()}" for key, dist in space.items())])


def search_values(
    trial: optuna.Trial | None, space: Mapping[str, Distribution], config: Any, fixed: bool
) -> dict[str, Any]:
    """The values of ``space`` for one run: suggested by a sampled trial; for a fixed trial, the config's own
    values, except those an enqueued parameter dict sets (suggested, so they are the trial's parameters)."""
    if not space:
        return {}
    if trial is None:
        return {key: config[key] for key in space}
    given: Mapping[str, Any] = {}
    if fixed:
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        given = frozen.system_attrs.get(ENQUEUED_PARAMS_ATTR, {})
    return {
        key: dist.suggest(trial, key) if not fixed or key in given else config[key]
        for key, dist in space.items()
    }
