"""The sampler's seeding rule: one random stream per trial number (the Optuna layer).

A sampler seeded once per process replays its random draws in every process that opens the study: a resumed
``tune`` repeats the random start-up trials of the first invocation, and two machines joining one study
propose the same parameters. :class:`PerTrialSeeded` instead builds the configured sampler afresh for each
trial, seeded with ``derive_seed(seed, trial.number)``. Trial numbers are unique within a study's storage, so

* a fresh single-process study is reproducible (trial ``n`` always gets the same stream for one ``seed``);
* every later invocation and every joining process draws from streams no earlier trial used.

Samplers whose next point is a function of the study's stored state rather than of their random stream
(``QMCSampler``: every process must share one scrambling seed) keep one sampler seeded with ``seed``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from lightning_dropout.tune.config import ClassSpec, build, make_sampler, resolve_spec

__all__ = ["PerTrialSeeded", "derive_seed", "seeded_sampler"]

# samplers that must share one seed across trials and processes (their sequence lives in the storage)
_SHARED_SEED = ("QMCSampler",)


def derive_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` of a study seeded with ``seed`` (a 32-bit integer)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(number)]).generate_state(1)[0])


class PerTrialSeeded(optuna.samplers.BaseSampler):
    """A sampler that delegates each trial to a fresh sampler seeded from the trial number (see the module
    docstring). ``build(seed)`` makes the configured sampler."""

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._build = build
        self._seed = seed
        self._lock = threading.Lock()
        self._by_number: dict[int, optuna.samplers.BaseSampler] = {}

    def sampler_for(self, number: int) -> optuna.samplers.BaseSampler:
        """The sampler that serves trial ``number`` (built on first use)."""
        with self._lock:
            sampler = self._by_number.get(number)
            if sampler is None:
                sampler = self._by_number[number] = self._build(derive_seed(self._seed, number))
            return sampler

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler_for(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.sampler_for(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.sampler_for(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.sampler_for(trial.number).before_trial(study, trial)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        try:
            self.sampler_for(trial.number).after_trial(study, trial, state, values)
        finally:
            with self._lock:
                self._by_number.pop(trial.number, None)

    def reseed_rng(self) -> None:
        # Optuna calls this in worker threads (n_jobs > 1) to decorrelate them: trial numbers already do
        pass


def seeded_sampler(spec: ClassSpec | dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
    """The study's sampler from its ``{class_path, init_args}`` spec under the seeding rule of this module. A
    ``seed`` in ``init_args`` replaces ``seed`` as the base of the per-trial seeds."""
    cls, args = resolve_spec("sampler", spec)
    base = args.pop("seed", None)
    base = seed if base is None else base
    if cls.__name__ in _SHARED_SEED:
        return make_sampler(spec, seed)
    make_sampler(spec, seed)  # validate now (a bad spec fails here, not inside the first trial)
    return PerTrialSeeded(lambda s: build("sampler", cls, args, seed=s), int(base))
