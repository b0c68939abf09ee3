"""The ``study:`` and ``dropout:`` sections of a tuning config, typed and validated once when loaded.

The whole file is read by LightningCLI/jsonargparse (``model``, ``data``, ``trainer`` follow the LightningCLI
``class_path``/``init_args`` convention, so an existing LightningCLI config works unchanged); these two
dataclasses add the tuner's own sections. Unknown keys and bad values fail at load time with the key path.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna

from lightning_dropout.errors import DropoutConfigError, closest
from lightning_dropout.secrets import redact
from lightning_dropout.tune.space import SearchGroup

__all__ = ["DropoutSpace", "StudyConfig", "make_pruner", "make_sampler", "redact"]

_DIRECTIONS = ("minimize", "maximize")


@dataclass
class DropoutSpace:
    """``dropout:``: the groups of sites to search (see :class:`~lightning_dropout.tune.space.SearchGroup`).

    May be empty in a config used only by ``fit``/``describe``; ``tune`` requires at least one group.
    """

    groups: list[SearchGroup] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.groups = [g if isinstance(g, SearchGroup) else SearchGroup(**g) for g in self.groups]
        names = [g.name for g in self.groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DropoutConfigError(f"`dropout.groups` names must be unique, but {dupes} repeat.")


@dataclass
class StudyConfig:
    """``study:``: what to optimize, how, and where the study is stored.

    Args:
        name: the study name (also the run directory's name under ``run_dir``).
        metric: the logged metric to optimize (from ``trainer.callback_metrics``), e.g. ``val_acc``.
        direction: ``maximize`` or ``minimize``.
        n_trials: the total number of finished trials the study should reach, counting those in storage.
        timeout: stop starting new trials after this many seconds (per ``tune`` invocation).
        sampler: an Optuna sampler by class name and arguments; default TPE, multivariate, grouped.
        pruner: an Optuna pruner by class name and arguments, or ``null`` for none; default successive halving
            keeping the better half of the trials at each rung from the second epoch.
        storage: an Optuna storage URL; default ``sqlite:///<run_dir>/<name>/study.db``. ``journal:PATH`` selects
            the journal-file storage; ``postgresql://...`` for many machines.
        seed: seeds the sampler and every trial's ``seed_everything``.
        workers: worker processes sharing the study on this machine.
        top_k: after the study, re-run the best ``top_k`` plans (and the baselines) over ``seeds`` seeds.
        seeds: seeds per re-run; 0 or 1 disables re-runs.
        run_dir: where the storage, TensorBoard logs and the best plan are written.
        baselines: enqueue the baselines (no dropout; the model's own dropout) before sampling.
        dropout_seed: draw dropout masks from their own generator seeded with this (common random numbers:
            trials differing only in dropout see the same initialization and data order); ``null`` uses the
            global generator.
        gap_samples: every trial runs a :class:`~lightning_dropout.monitor.GapMonitor` on this many training
            examples (logged ``gap/<metric>``; the HParams record gets the gap at the best epoch); 0 disables it.
        mc_samples: with ``>= 2``, every trial also runs an
            :class:`~lightning_dropout.monitor.UncertaintyMonitor` with this many MC-dropout passes (logged
            ``mc/ece``, ``mc/entropy``); 0 disables it.
    """

    name: str = "dropout-study"
    metric: str = "val_loss"
    direction: str = "minimize"
    n_trials: int = 20
    timeout: float | None = None
    sampler: dict[str, Any] = field(
        default_factory=lambda: {"name": "TPESampler", "args": {"multivariate": True, "group": True}}
    )
    pruner: dict[str, Any] | None = field(
        # 4.8x fewer epochs than no pruning at an equal best (within noise) on 40 MNIST-1D trials, where
        # MedianPruner saved 2.2x (benchmarks/results/tuning.md)
        default_factory=lambda: {
            "name": "SuccessiveHalvingPruner",
            "args": {"min_resource": 1, "reduction_factor": 2},
        }
    )
    storage: str | None = None
    seed: int = 0
    workers: int = 1
    top_k: int = 3
    seeds: int = 3
    run_dir: str = "runs"
    baselines: bool = True
    dropout_seed: int | None = 1234
    gap_samples: int = 256
    mc_samples: int = 0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise DropoutConfigError(
                f"`study.name` must use letters, digits, '_', '.', '-', but got {self.name!r}."
            )
        if self.direction not in _DIRECTIONS:
            raise DropoutConfigError(
                f"`study.direction` must be one of {list(_DIRECTIONS)}, but got {self.direction!r}."
            )
        for key in ("n_trials", "workers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DropoutConfigError(f"`study.{key}` must be an integer >= 1, but got {key}={value!r}.")
        for key in ("top_k", "seeds", "gap_samples", "mc_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DropoutConfigError(f"`study.{key}` must be an integer >= 0, but got {key}={value!r}.")
        if self.mc_samples == 1:
            raise DropoutConfigError("`study.mc_samples` must be 0 (off) or >= 2, but got mc_samples=1.")
        if self.timeout is not None and not self.timeout > 0:
            raise DropoutConfigError(
                f"`study.timeout` must be > 0 seconds or null, but got {self.timeout!r}."
            )
        make_sampler(self.sampler, self.seed)  # fail at load time, not after the first trial
        make_pruner(self.pruner)

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.run_dir}/{self.name}/study.db"


def _build(kind: str, module: Any, spec: dict[str, Any] | None, base: type, **extra: Any) -> Any:
    if not isinstance(spec, dict) or set(spec) - {"name", "args"} or "name" not in spec:
        raise DropoutConfigError(
            f"`study.{kind}` must be a mapping {{name: ..., args: {{...}}}}, but got {spec!r}."
        )
    choices = sorted(
        n
        for n in dir(module)
        if inspect.isclass(getattr(module, n))
        and issubclass(getattr(module, n), base)
        and not n.startswith("Base")
    )
    cls = getattr(module, str(spec["name"]), None)
    if cls is None or not inspect.isclass(cls) or not issubclass(cls, base):
        raise DropoutConfigError(
            f"`study.{kind}.name` must be an Optuna {kind} class, but got {spec['name']!r}; "
            f"nearest: {closest(str(spec['name']), choices)}; choices: {choices}."
        )
    args = dict(spec.get("args") or {})
    params = inspect.signature(cls).parameters
    for key, value in extra.items():
        if key in params and key not in args:
            args[key] = value
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # e.g. TPE's `group`
            return cls(**args)
    except (TypeError, ValueError) as err:
        raise DropoutConfigError(f"`study.{kind}` {spec['name']}({args}) failed: {err}") from None


def make_sampler(spec: dict[str, Any], seed: int | None = None) -> optuna.samplers.BaseSampler:
    """An Optuna sampler from ``{name, args}`` (seeded with ``seed`` unless ``args`` sets one)."""
    return _build("sampler", optuna.samplers, spec, optuna.samplers.BaseSampler, seed=seed)


def make_pruner(spec: dict[str, Any] | None) -> optuna.pruners.BasePruner:
    """An Optuna pruner from ``{name, args}``; ``None`` gives ``NopPruner``."""
    if spec is None:
        return optuna.pruners.NopPruner()
    return _build("pruner", optuna.pruners, spec, optuna.pruners.BasePruner)
