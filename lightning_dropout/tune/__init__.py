"""Tuning studies: per-layer dropout rate and variant search with Optuna (the only layer that imports Optuna)."""

from lightning_dropout.tune.config import DropoutSpace, StudyConfig, make_pruner, make_sampler, redact
from lightning_dropout.tune.runner import (
    Candidate,
    TrialPruning,
    Tuner,
    candidates,
    open_storage,
    open_study,
    rerun,
    run_workers,
    winner,
)
from lightning_dropout.tune.space import SearchGroup, suggest_plan

__all__ = [
    "Candidate",
    "DropoutSpace",
    "SearchGroup",
    "StudyConfig",
    "TrialPruning",
    "Tuner",
    "candidates",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "open_study",
    "redact",
    "rerun",
    "run_workers",
    "suggest_plan",
    "winner",
]
