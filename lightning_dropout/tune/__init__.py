"""Tuning studies: per-layer dropout rate and variant search with Optuna (the only layer that imports Optuna)."""

from lightning_dropout.redaction import redact
from lightning_dropout.tune.api import StudyResult, tune_study
from lightning_dropout.tune.config import DropoutSpace, StudyConfig, make_pruner, make_sampler
from lightning_dropout.tune.pruning import TrialPruning
from lightning_dropout.tune.records import candidates, open_storage, open_study, winner
from lightning_dropout.tune.reruns import rerun
from lightning_dropout.tune.runner import Tuner
from lightning_dropout.tune.selection import Candidate
from lightning_dropout.tune.space import SearchGroup, suggest_plan
from lightning_dropout.tune.workers import Workers, run_workers

__all__ = [
    "Candidate",
    "DropoutSpace",
    "SearchGroup",
    "StudyConfig",
    "StudyResult",
    "TrialPruning",
    "Tuner",
    "Workers",
    "candidates",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "open_study",
    "redact",
    "rerun",
    "run_workers",
    "suggest_plan",
    "tune_study",
    "winner",
]
