"""The ``study:`` and ``dropout:`` sections of a tuning config, typed and validated once when loaded.

The whole file is read by LightningCLI/jsonargparse (``model``, ``data``, ``trainer`` follow the LightningCLI
``class_path``/``init_args`` convention, so an existing LightningCLI config works unchanged); these two
dataclasses add the tuner's own sections. Unknown keys and bad values fail at load time with the key path.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import optuna
from jsonargparse.typing import register_type

from lightning_dropout.errors import (
    DropoutConfigError,
    check_int,
    check_number,
    check_rate,
    closest,
    strict_init,
)
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.redaction import remember
from lightning_dropout.tune.population import PopulationConfig, population_size
from lightning_dropout.tune.selection import WINNER_RULES
from lightning_dropout.tune.space import SearchGroup
from lightning_dropout.tune.value import ESTIMATORS

__all__ = [
    "CONFIG_SECTIONS",
    "STORAGE_ENV",
    "ClassSpec",
    "DropoutSpace",
    "StudyConfig",
    "build",
    "make_pruner",
    "make_sampler",
    "resolve_spec",
    "resolve_storage",
]

_DIRECTIONS = ("minimize", "maximize")
DEFAULT_BUDGET = (
    10.0  # trainings, when a study sets none of budget, n_trials, top_k, seeds (docs/tuning.md, "Budget")
)
DEFAULT_N_TRIALS = 20  # without a budget
DEFAULT_TOP_K = 3
DEFAULT_SEEDS = 3  # without a budget
MAX_SEED = 2**31 - 1  # seed_everything takes 0 .. 2**32 - 1; trials and re-runs add to it
MAX_RERUNS = 100  # the most `top_k` and `seeds`: each one more is a whole training per candidate
MAX_WORKERS = 256  # worker processes of one `tune` on one machine
BUDGET_MAX_SEEDS = 10  # with a budget: the most seeds the race gives one candidate (the budget ends it first)

METHODS = ("trials", "pbt")  # `study.method`: sampled trials, or population-based training


class ClassSpec:
    """``{class_path: ..., init_args: {...}}`` as written, for ``study.sampler`` and ``study.pruner``.

    The tuner builds these classes itself (the sampler once per trial, seeded from the trial number), so the
    config parser only carries the mapping: it is registered with jsonargparse as an opaque type (a plain
    ``dict`` holding a ``class_path`` would be taken for a class to import while merging a config file with
    command-line overrides). Validated by :func:`resolve_spec` when the study config is built.
    """

    def __init__(self, value: Any) -> None:
        self.value: Any = value.value if isinstance(value, ClassSpec) else value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassSpec) and other.value == self.value

    def __hash__(self) -> int:
        return hash(json.dumps(self.value, sort_keys=True, default=str))

    def __repr__(self) -> str:
        return f"ClassSpec({self.value!r})"

    def serialize(self) -> Any:
        """The mapping as written (what a saved config holds)."""
        return self.value


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


@strict_init
@dataclass
class StudyConfig:
    """``study:``: what to optimize, how, and where the study is stored.

    Args:
        name: the study name (also the run directory's name under ``run_dir``).
        metric: the logged metric to optimize (from ``trainer.callback_metrics``), e.g. ``val_acc``.
        direction: ``maximize`` or ``minimize``.
        budget: the study's total training compute, in trainings of the model (``trainer.max_epochs`` epochs
            each): every trial (a pruned one by the epochs it ran), the baselines, the grid and the re-runs count.
            The study fits its warm-start grid, trials and racing re-runs into it and stops when it is used, across
            workers, machines and resumed runs. Default 10 when none of ``n_trials``, ``top_k`` and ``seeds`` is
            set (a study that sets them and no budget runs as they say); ``null`` with them set: no budget.
        n_trials: the total number of finished trials the study should reach, counting those in storage (default
            20 without a budget; with a budget, a further cap if set).
        timeout: stop starting new trials after this many seconds (per ``tune`` invocation).
        sampler: an Optuna sampler as ``{class_path, init_args}`` (the LightningCLI convention: any importable
            subclass of ``optuna.samplers.BaseSampler``, your own included); default TPE, multivariate, grouped.
        pruner: an Optuna pruner as ``{class_path, init_args}``, or ``null`` for none; default the median rule
            (a trial is stopped when it is worse than the median of the earlier trials at the same epoch).
        prune_after: the pruner is asked only from this share of ``trainer.max_epochs`` on (0 to 1; default 0.2): dropout
            learns slower in the first epochs, so early comparisons are biased against it. Baselines, the
            warm-start grid and enqueued trials are never pruned (they still report, as references).
        threads: torch threads of each trial process; default one (or ``$OMP_NUM_THREADS`` when set). Small
            models run fastest on one thread, and several threads per process thrash as soon as another
            process shares the cores.
        storage: an Optuna storage URL; default ``$LIGHTNING_DROPOUT_STORAGE`` when set, else
            ``sqlite:///<run_dir>/<name>/study.db``. ``journal:PATH`` selects the journal-file storage;
            ``postgresql://...`` for many machines (a password is best left to the environment variable).
        seed: seeds the sampler and every trial's ``seed_everything`` (0 .. 2**31 - 1).
        workers: worker processes sharing the study on this machine (the ``tune`` process is worker 0; at most
            256), or
            ``auto``: as many as fit, ``len(devices) // trainer.devices`` with GPUs, else the CPU cores divided by
            the threads of one trial (``threads`` x ``trainer.devices``).
        devices: the GPUs this ``tune`` divides among its workers, as ``CUDA_VISIBLE_DEVICES`` names them (indices
            or UUIDs); default every visible GPU when the trainer runs on CUDA with several workers (one worker alone
            keeps the GPUs Lightning picks). Worker ``i`` gets the ``trainer.devices`` GPUs after those of workers
            ``0 .. i-1`` (:mod:`~lightning_dropout.tune.devices`).
        top_k: after the study, re-run the best ``top_k`` plans (and the baselines) over ``seeds`` seeds
            (default 3; with a budget, the most that fit; at most 100).
        seeds: the most seeds a re-run candidate gets (default 3; with a budget, 10: the budget ends the race);
            0 or 1 disables re-runs; at most 100.
        race_alpha: the re-runs race (one seed per round for every candidate still in it): from 3 paired seeds
            on, a candidate that a one-sided paired t-test finds worse than the leader is dropped. ``race_alpha``
            is the race's error rate per candidate, the chance of ever dropping a candidate (the best one
            included) that is not worse than its leader (Bonferroni over every round and possible leader); 0
            runs every candidate on every seed.
        run_dir: where the storage, TensorBoard logs and the best plan are written.
        baselines: enqueue the baselines (no dropout; the model's own dropout) before sampling.
        dropout_seed: draw dropout masks from their own generator seeded with this (common random numbers:
            trials differing only in dropout see the same initialization and data order); ``null`` uses the
            global generator.
        gap_samples: every trial runs a :class:`~lightning_dropout.monitor.GapMonitor` on this many training
            examples (logged ``gap/<metric>``; the HParams record gets the gap at the best epoch); 0 disables it.
        mc_samples: with ``>= 2``, every trial also runs an
            :class:`~lightning_dropout.uncertainty.UncertaintyMonitor` with this many MC-dropout passes (logged
            ``mc/ece``, ``mc/entropy``); 0 disables it.
        value: how a run's validation curve becomes its value (trials and re-runs alike): ``best`` (the best
            epoch), ``window`` (the mean of ``value_window`` epochs around the best), ``ema`` (the best of an
            exponential moving average), ``tail`` (the mean of the last ``value_window`` epochs) or ``last``.
            The pruner still sees every epoch's value.
        value_window: the number of epochs ``window`` and ``tail`` average (and the span of ``ema``).
        warm_start: after the baselines, enqueue the uniform design a user would run by hand: every group at
            its first variant with the same rate, once per rate of ``warm_start_rates`` (clipped into each
            group's ``p`` range). The best of them is always re-run over seeds.
        warm_start_rates: the rates of the warm start.
        enqueue: your own trials, run before the sampled ones: each item is a plan (``{sites: [...]}``, or
            ``{plan: PATH}`` naming a plan YAML file) or a mapping of Optuna parameter names to values
            (``{"hidden/variant": "standard", "hidden/standard/p": 0.25}``; unset parameters are sampled).
        winner: how the winner is chosen among the re-run candidates: ``one_se`` (the least dropout among the
            candidates within one standard error of the best mean, on paired seeds) or ``best_mean``.
        method: ``trials`` (one training per trial, sampled plans) or ``pbt`` (population-based training: the
            rates change while ``population.size`` members train; see :mod:`~lightning_dropout.tune.pbt`).
        population: the settings of ``method: pbt`` (:class:`~lightning_dropout.tune.population.PopulationConfig`:
            ``size``, ``interval``, ``quantile``, ``resample_probability``, ``perturb``).
    """

    name: str = "dropout-study"
    metric: str = "val_loss"
    direction: str = "minimize"
    budget: float | None = None
    n_trials: int | None = None
    timeout: float | None = None
    sampler: ClassSpec = field(
        default_factory=lambda: ClassSpec(
            {
                "class_path": "optuna.samplers.TPESampler",
                "init_args": {"multivariate": True, "group": True},
            }
        )
    )
    pruner: ClassSpec | None = field(
        # the median of the earlier trials at the same epoch, asked only from `prune_after` on: successive
        # halving from the first epoch pruned 13 of 14 quickstart trials, the whole warm-start grid included,
        # because dropout trails no dropout in the first epochs (docs/tuning.md, "Pruning")
        default_factory=lambda: ClassSpec(
            {"class_path": "optuna.pruners.MedianPruner", "init_args": {"n_startup_trials": 5}}
        )
    )
    # 0.2: at 150 epochs it trained 1.3x (with the warm start) to 1.7x (without) fewer epochs than no pruner at
    # the same best trial, where 0.5 saved 1.1-1.2x (benchmarks/results/tuning_150*.md)
    prune_after: float = 0.2
    storage: str | None = None
    seed: int = 0
    workers: int | str = 1
    devices: list[int | str] | None = None
    threads: int | None = None
    top_k: int | None = None
    seeds: int | None = None
    race_alpha: float = 0.05
    run_dir: str = "runs"
    baselines: bool = True
    dropout_seed: int | None = 1234
    gap_samples: int = 256
    mc_samples: int = 0
    value: str = "ema"
    value_window: int = 5
    warm_start: bool = True
    warm_start_rates: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    winner: str = "one_se"
    method: str = "trials"
    population: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.storage, str):
            remember(self.storage)  # before any message could show it
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise DropoutConfigError(
                f"`study.name` must use letters, digits, '_', '.', '-', but got {self.name!r}."
            )
        if set(self.name) == {"."}:  # `..` would put the study's folder outside run_dir
            raise DropoutConfigError(
                f"`study.name` must hold a letter, digit, '_' or '-' (it names a folder in run_dir), but got "
                f"{self.name!r}."
            )
        if self.direction not in _DIRECTIONS:
            raise DropoutConfigError(
                f"`study.direction` must be one of {list(_DIRECTIONS)}, but got {self.direction!r}."
            )
        if (
            isinstance(self.prune_after, bool)
            or not isinstance(self.prune_after, (int, float))
            or not (0 <= self.prune_after <= 1)
        ):
            raise DropoutConfigError(
                f"`study.prune_after` must satisfy 0 <= prune_after <= 1, but got prune_after={self.prune_after!r}."
            )
        check_int(self.threads, "threads", key="study.threads", or_none="null")
        self._resolve_budget()
        if self.workers != "auto" and (
            isinstance(self.workers, bool)
            or not isinstance(self.workers, int)
            or not 1 <= self.workers <= MAX_WORKERS
        ):
            raise DropoutConfigError(
                f"`study.workers` must be an integer with 1 <= workers <= {MAX_WORKERS} or auto (as many as fit), "
                f"but got workers={self.workers!r:.40}."
            )
        # a trial adds its number to the seed, a re-run 1000 per seed
        check_int(self.seed, "seed", 0, key="study.seed", maximum=MAX_SEED)
        check_int(
            self.dropout_seed, "dropout_seed", 0, key="study.dropout_seed", or_none="null", maximum=MAX_SEED
        )
        check_int(self.value_window, "value_window", key="study.value_window")
        self.devices = _check_devices(self.devices)
        if self.value not in ESTIMATORS:
            raise DropoutConfigError(
                f"`study.value` must be one of {list(ESTIMATORS)}, but got {self.value!r}; "
                f"nearest: {closest(str(self.value), ESTIMATORS)}."
            )
        if self.winner not in WINNER_RULES:
            raise DropoutConfigError(
                f"`study.winner` must be one of {list(WINNER_RULES)}, but got {self.winner!r}; "
                f"nearest: {closest(str(self.winner), WINNER_RULES)}."
            )
        self.warm_start_rates = [
            check_rate(r, f"study.warm_start_rates[{i}]") for i, r in enumerate(self.warm_start_rates)
        ]
        self.enqueue = [_check_enqueued(item, i) for i, item in enumerate(self.enqueue)]
        for key in ("top_k", "seeds"):
            check_int(getattr(self, key), key, 0, key=f"study.{key}", maximum=MAX_RERUNS)
        for key in ("gap_samples", "mc_samples"):
            check_int(getattr(self, key), key, 0, key=f"study.{key}")
        if self.mc_samples == 1:
            raise DropoutConfigError("`study.mc_samples` must be 0 (off) or >= 2, but got mc_samples=1.")
        check_number(self.timeout, "timeout", key="study.timeout", or_none="null")  # seconds
        if (
            isinstance(self.race_alpha, bool)
            or not isinstance(self.race_alpha, (int, float))
            or not 0 <= self.race_alpha < 1
        ):
            raise DropoutConfigError(
                f"`study.race_alpha` must satisfy 0 <= race_alpha < 1 (0: no candidate is dropped), but got "
                f"race_alpha={self.race_alpha!r}."
            )

        if self.method not in METHODS:
            raise DropoutConfigError(
                f"`study.method` must be one of {list(METHODS)}, but got {self.method!r}; "
                f"nearest: {closest(str(self.method), METHODS)}."
            )
        population = dict(self.population or {}) if isinstance(self.population, dict) else self.population
        if self.method == "pbt" and isinstance(population, dict) and "size" not in population:
            population["size"] = population_size(self.budget)  # a PBT study costs `size` trainings
        self.population = PopulationConfig.from_mapping(population).to_dict()
        self.sampler = ClassSpec(self.sampler)  # a mapping from Python, a ClassSpec from the config parser
        pruner = ClassSpec(self.pruner)
        self.pruner = None if pruner.value is None else pruner
        make_sampler(self.sampler, self.seed)  # fail at load time, not after the first trial
        make_pruner(self.pruner)

    def _resolve_budget(self) -> None:
        """The default budget when the study sets none of ``budget``, ``n_trials``, ``top_k``, ``seeds``; the
        defaults of the others otherwise."""
        check_number(self.budget, "budget", 1.0, inclusive=True, key="study.budget", or_none="null")
        if self.budget is not None:
            self.budget = float(self.budget)
        elif self.n_trials is None and self.top_k is None and self.seeds is None:
            self.budget = DEFAULT_BUDGET
        if self.budget is None:
            self.n_trials = DEFAULT_N_TRIALS if self.n_trials is None else self.n_trials
        check_int(self.n_trials, "n_trials", key="study.n_trials", or_none="null" if self.budget else "")
        self.top_k = DEFAULT_TOP_K if self.top_k is None else self.top_k
        if self.seeds is None:
            self.seeds = BUDGET_MAX_SEEDS if self.budget is not None else DEFAULT_SEEDS

    def population_config(self) -> PopulationConfig:
        """``population`` as a :class:`~lightning_dropout.tune.population.PopulationConfig` (validated at load)."""
        return PopulationConfig.from_mapping(self.population)

    def torch_threads(self) -> int:
        """The torch threads of a trial process: ``threads``, else ``$OMP_NUM_THREADS``, else 1."""
        if self.threads is not None:
            return self.threads
        env = os.environ.get("OMP_NUM_THREADS", "")
        return int(env) if env.isdigit() and int(env) > 0 else 1

    def gpu_list(self) -> list[str] | None:
        """``devices`` as ``CUDA_VISIBLE_DEVICES`` entries (``None`` when not set)."""
        return None if self.devices is None else [str(d) for d in self.devices]

    def storage_url(self) -> str:
        """The storage this study opens (:func:`resolve_storage`)."""
        return resolve_storage(self.storage, self.name, self.run_dir)


STORAGE_ENV = (
    "LIGHTNING_DROPOUT_STORAGE"  # the storage URL of a study that names none (keeps passwords out of files)
)


def default_storage(name: str, run_dir: str = "runs") -> str:
    """The storage of a study that names none, with no ``$LIGHTNING_DROPOUT_STORAGE``:
    ``sqlite:///<run_dir>/<name>/study.db``."""
    return f"sqlite:///{run_dir}/{name}/study.db"


def resolve_storage(storage: str | None, name: str, run_dir: str = "runs") -> str:
    """The storage URL of a study, the one place it is decided: ``storage`` when given (the command line's
    ``--storage``/``--study.storage``, else the config's ``study.storage``), else the environment variable
    ``LIGHTNING_DROPOUT_STORAGE`` (when set and not empty), else :func:`default_storage`. Spawned workers and
    trial processes inherit the environment, so they open the same storage."""
    url = storage or os.environ.get(STORAGE_ENV) or default_storage(name, run_dir)
    remember(url)  # hidden in every line this process prints, whatever its characters
    return url


def _check_devices(devices: Any) -> list[int | str] | None:
    """``study.devices``: ``null`` or a non-empty list of distinct GPU indices (>= 0) or names (UUIDs)."""
    if devices is None:
        return None
    ok = (
        isinstance(devices, list)
        and devices
        and all(
            (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
            or (isinstance(d, str) and re.fullmatch(r"[A-Za-z0-9_.:/-]+", d))
            for d in devices
        )
    )
    if not ok or len({str(d) for d in devices}) != len(devices):
        raise DropoutConfigError(
            "`study.devices` must be null (every visible GPU) or a list of distinct GPU indices (>= 0) or UUIDs, "
            f"as CUDA_VISIBLE_DEVICES takes them (e.g. [0, 1, 2, 3]), but got devices={devices!r}."
        )
    return list(devices)


def _check_enqueued(item: Any, index: int) -> dict[str, Any]:
    """One ``study.enqueue`` item, checked and normalized to a plan (``{"sites": [...]}``, a file named by
    ``{"plan": PATH}`` read here) or to ``{"params": {...}}`` (Optuna parameter names to values)."""
    where = f"`study.enqueue[{index}]`"
    if not isinstance(item, dict) or not item:
        raise DropoutConfigError(
            f"{where} must be a plan ({{sites: [...]}} or {{plan: PATH}}) or a mapping of Optuna parameter "
            f"names to values, but got {item!r}."
        )
    if "sites" in item:
        return DropoutPlan.from_dict(item, where_from=where).to_dict()
    if set(item) == {"plan"}:
        return DropoutPlan.load(str(item["plan"])).to_dict()
    params = item["params"] if set(item) == {"params"} else item
    bad = (
        [k for k in params if not isinstance(k, str) or "/" not in k] if isinstance(params, dict) else params
    )
    if bad:
        raise DropoutConfigError(
            f"{where} must map Optuna parameter names ('<group>/variant', '<group>/<variant>/p', ...) to values, "
            f"but got {bad!r}."
        )
    return {"params": dict(params)}


_KINDS = {"sampler": "samplers", "pruner": "pruners"}


def _import_class(path: str) -> type | None:
    """The class at the dotted ``path`` (``None`` when it does not import or is not a class)."""
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError, ValueError):
        return None
    return found if inspect.isclass(found) else None


def resolve_spec(kind: str, spec: Any) -> tuple[type, dict[str, Any]]:
    """The class and ``init_args`` of ``study.<kind>`` (``sampler`` or ``pruner``), given LightningCLI-style as
    ``{class_path: ..., init_args: {...}}``. ``class_path`` is any importable subclass of Optuna's base class (a
    user's own included); a bare name (``TPESampler``) is looked up in ``optuna.samplers``/``optuna.pruners``.
    The former ``{name, args}`` form is refused with the rewrite."""
    spec = spec.value if isinstance(spec, ClassSpec) else spec
    where, module = f"study.{kind}", _KINDS[kind]
    base: type = getattr(optuna, module).BasePruner if kind == "pruner" else optuna.samplers.BaseSampler
    if isinstance(spec, dict) and "name" in spec and "class_path" not in spec:
        path = f"optuna.{module}.{spec['name']}" if "." not in str(spec["name"]) else str(spec["name"])
        args = spec.get("args") or {}
        raise DropoutConfigError(
            f"`{where}` must be given as {{class_path, init_args}} (the LightningCLI convention), but got the "
            f"former form {spec!r}; write it as {{class_path: {path}, init_args: {json.dumps(args)}}}."
        )
    if not isinstance(spec, dict) or "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
        raise DropoutConfigError(
            f"`{where}` must be a mapping {{class_path: optuna.{module}.<Class>, init_args: {{...}}}}, but got "
            f"{spec!r}."
        )
    path = str(spec["class_path"])
    cls = _import_class(path if "." in path else f"optuna.{module}.{path}")
    if cls is None or not issubclass(cls, base):
        choices = sorted(
            n
            for n in dir(getattr(optuna, module))
            if inspect.isclass(getattr(getattr(optuna, module), n))
            and issubclass(getattr(getattr(optuna, module), n), base)
            and not n.startswith("Base")
        )
        last = path.rpartition(".")[2]
        why = "does not import" if cls is None else f"is not a subclass of optuna.{module}.{base.__name__}"
        near = closest(last, choices) or choices
        raise DropoutConfigError(
            f"`{where}.class_path` must name an importable Optuna {kind} class (optuna.{module}.<Class>, or your "
            f"own subclass of {base.__name__}), but {path!r} {why}; nearest: "
            f"{[f'optuna.{module}.{n}' for n in near]}."
        )
    args = spec.get("init_args") or {}
    if not isinstance(args, dict):
        raise DropoutConfigError(f"`{where}.init_args` must be a mapping, but got {args!r}.")
    return cls, dict(args)


def build(kind: str, cls: type, args: dict[str, Any], **extra: Any) -> Any:
    """``cls(**args)``, adding each of ``extra`` the class takes and ``args`` does not set; a refusal becomes a
    :class:`DropoutConfigError` naming ``study.<kind>``."""
    args = dict(args)
    params = inspect.signature(cls).parameters
    for key, value in extra.items():
        if key in params and key not in args:
            args[key] = value
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # e.g. TPE's `group`
            return cls(**args)
    except (TypeError, ValueError) as err:
        raise DropoutConfigError(f"`study.{kind}` {cls.__name__}({args}) failed: {err}") from None


def make_sampler(spec: ClassSpec | dict[str, Any], seed: int | None = None) -> optuna.samplers.BaseSampler:
    """An Optuna sampler from ``{class_path, init_args}`` (seeded with ``seed`` unless ``init_args`` sets one)."""
    cls, args = resolve_spec("sampler", spec)
    return cast(optuna.samplers.BaseSampler, build("sampler", cls, args, seed=seed))


def make_pruner(spec: ClassSpec | dict[str, Any] | None) -> optuna.pruners.BasePruner:
    """An Optuna pruner from ``{class_path, init_args}``; ``None`` gives ``NopPruner``."""
    if spec is None or (isinstance(spec, ClassSpec) and spec.value is None):
        return optuna.pruners.NopPruner()
    cls, args = resolve_spec("pruner", spec)
    return cast(optuna.pruners.BasePruner, build("pruner", cls, args))


CONFIG_SECTIONS: dict[str, tuple[Any, str]] = {
    "study": (StudyConfig, "the Optuna study (tune)"),
    "dropout": (DropoutSpace, "where dropout may go and what to search (tune)"),
    "search": (dict[str, Any] | None, "other config values to search, by dotted key (tune)"),
}
"""The tuner's top-level sections of a config, for :func:`lightning_dropout.config.load_config`: always
known (and validated), so one file serves ``tune``, ``fit`` and ``describe``; ``search`` is validated against
the parsed config by :func:`lightning_dropout.tune.search.parse_search`."""

# study.sampler/pruner travel through the config parser as written (see ClassSpec)
register_type(ClassSpec, serializer=ClassSpec.serialize, deserializer=ClassSpec)
