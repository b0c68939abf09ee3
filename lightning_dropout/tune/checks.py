"""Checks ``tune`` runs once before trial 0, so a config that would fail every trial fails in one line instead.

* every search group selects at least one site of the model, with every variant it lists (a group that matches
  nothing, or ``dropblock`` on Linear layers, would otherwise fail each trial while the baseline "wins");
* every ``study.enqueue`` item given as Optuna parameters names the space's dimensions, with values in their
  domains (a bad value would otherwise fail the enqueued trial only, and the study would go on without it);
* ``study.run_dir`` can be written (else every trial fails with a misleading reason and uses up ``n_trials``);
* the config's ``trainer.callbacks`` list no DropoutInjector: the tuner injects each trial's plan itself, and
  one in the config would stack its dropout on every trial, the no-dropout baseline included.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lightning_dropout.callback import DropoutInjector
from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.injection import check_plan
from lightning_dropout.tune.space import SearchGroup, check_enqueued

__all__ = ["check_enqueue", "check_groups", "check_no_injector", "check_no_plan", "check_run_dir"]


def check_groups(groups: Sequence[SearchGroup], model: nn.Module, example_input: Any = None) -> None:
    """Raise when a group selects no site of ``model`` or one of its variants cannot go on a selected site
    (the same check, and message, as ``fit``/``describe`` for a rule). A model that builds its layers later
    (in ``configure_model``) has nothing to check yet."""
    if _builds_later(model):
        return
    for group in groups:
        try:
            for plan in group.probe(model, example_input).values():
                check_plan(model, plan, example_input)
        except DropoutConfigError as err:
            raise DropoutConfigError(f"dropout.groups[{group.name!r}]: {err}") from None


def check_enqueue(
    enqueue: Sequence[Mapping[str, Any]],
    groups: Sequence[SearchGroup],
    model: nn.Module,
    example_input: Any = None,
) -> None:
    """Raise unless every ``study.enqueue`` item given as Optuna parameters names dimensions of the search
    space with values in their domains: a bad one is found here, not when its trial runs. A model that builds
    its layers later (in ``configure_model``) has no sites to check yet."""
    if _builds_later(model):
        return
    for i, item in enumerate(enqueue):
        if "params" in item:
            check_enqueued(groups, model, item["params"], f"study.enqueue[{i}]", example_input)


def _builds_later(model: nn.Module) -> bool:
    """Whether ``model`` has no parameters yet (it builds its layers in ``configure_model``)."""
    return not any(True for _ in model.parameters())


def check_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Raise unless ``run_dir`` is, or can be made, a directory this user can write: a temporary file is tried
    in it, or in its nearest existing ancestor when it does not exist yet. Nothing is created or removed, so a
    failing config leaves nothing behind and processes starting together never race on the directory."""
    path = Path(run_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file, not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = (err.strerror or type(err).__name__).lower()
        raise DropoutConfigError(
            f"`study.run_dir` must be a directory this user can write, but {str(run_dir)!r} is not: {reason}."
        ) from None


def check_no_injector(callbacks: Sequence[Any]) -> None:
    """Refuse a config whose ``trainer.callbacks`` list a DropoutInjector (see the module docstring)."""
    found = [c for c in callbacks if isinstance(c, DropoutInjector)]
    if found:
        raise DropoutConfigError(
            "`trainer.callbacks` must not list a DropoutInjector when tuning (each trial injects its own plan; "
            f"yours would add its dropout to every trial, the no-dropout baseline included), but it lists {found}; "
            "remove it from the config, or tune a copy without it (to compare its dropout, enqueue its "
            "plan: `study.enqueue: [{plan: PLAN.yaml}]`)."
        )


def check_no_plan(plan: Any) -> None:
    """Refuse a plan given to ``tune`` (``--plan`` or a ``plan:`` key): the study searches the plan, so one given
    would be ignored in silence."""
    if plan:
        raise DropoutConfigError(
            "`plan` must not be given to `tune`: the study searches the plan (the config's `dropout:` section), "
            f"so it would be ignored, but got plan={plan!r}; remove it, or train with it: "
            "`lightning-dropout fit CONFIG --plan PLAN.yaml` (to compare it in the study, enqueue it: "
            "`study.enqueue: [{plan: PLAN.yaml}]`)."
        )
