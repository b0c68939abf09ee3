"""DropoutInjector: a Lightning callback that puts dropout into any LightningModule (the Lightning layer).

The algorithm lives in :mod:`lightning_dropout.injection`; this callback only decides *when*:

* ``setup()`` injects: it runs before ``configure_model``'s result is used, before checkpoint weights are
  restored, before ``configure_optimizers`` and before DDP wraps the model (``Trainer._run`` order), so
  learned rates reach the optimizer, checkpoints load into the injected tree, and every DDP rank builds the
  same tree from the same plan. Layers built in ``configure_model`` are created first by calling it (as
  Lightning's ``WeightAveraging`` does; Lightning requires ``configure_model`` to be idempotent).
* ``on_fit_start()`` checks that learned rates are visible to an optimizer.
* ``on_train_epoch_start()`` / ``on_train_batch_start()`` apply the rate schedule from the trainer's progress
  counters, so a resumed run continues where it stopped; a plan's own per-site schedules (``Site.rates``, the
  rates a population-based training member followed) are applied at each epoch start. Rates that cannot change
  within an epoch (constant, or on an epoch schedule) are logged once per epoch, at its start; ``on_train_batch_end()`` logs those that
  can (step schedules, learned rates) and the measured drop fractions.
* Concrete dropout's regularizer is added to the loss that ``training_step`` returns (automatic
  optimization); nothing in the module changes.

Example:
    >>> import lightning as L
    >>> from torch import nn
    >>> injector = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.2)])
    >>> trainer = L.Trainer(callbacks=[injector], logger=False, enable_progress_bar=False)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_dropout.checkpoints import load_checkpoint
from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.handles import bind_schedules
from lightning_dropout.injection import (
    Rule,
    SiteHandle,
    describe,
    format_sites,
    inject,
    regularization,
    resolve,
    site_handles,
)
from lightning_dropout.plan import DropoutPlan, as_plan
from lightning_dropout.rules import as_rules
from lightning_dropout.scalars import LOG_PREFIX, rate_tag, scalar_layout, write_layout
from lightning_dropout.schedules import Schedule
from lightning_dropout.variants import ConcreteDropout

__all__ = ["DropoutInjector", "load_checkpoint"]

log = logging.getLogger(__name__)

PlanProvider = Callable[[pl.LightningModule], DropoutPlan]
"""Chooses a plan from the freshly set-up module (see ``DropoutInjector(plan=...)``)."""


class _RegularizedTrainingStep:
    """Stands in for ``pl_module.training_step``: calls the class's own method, adds the rate regularizer to
    the loss it returns. Holds the module, not a bound method, so it pickles (``ddp_spawn``)."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    @property
    def __wrapped__(self) -> Any:  # what Lightning's `is_overridden` inspects
        return type(self.module).training_step

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = type(self.module).training_step(self.module, *args, **kwargs)
        if out is None:
            return out
        reg = regularization(self.module)
        if getattr(self.module, "_trainer", None) is not None:  # also callable outside a Trainer
            self.module.log(f"{LOG_PREFIX}/regularizer", reg.detach(), on_step=True, on_epoch=False)
        if isinstance(out, Tensor):
            return out + reg
        if isinstance(out, Mapping) and "loss" in out:
            return {**out, "loss": out["loss"] + reg}
        return out


class DropoutInjector(Callback):
    """Inject dropout into the trained LightningModule without editing it.

    Args:
        rules: where dropout goes (:class:`~lightning_dropout.injection.Rule`, or mappings with its fields, as
            a LightningCLI YAML gives them); resolved against the model in ``setup``.
        plan: an explicit :class:`~lightning_dropout.plan.DropoutPlan` (or a path to its YAML, as
            ``lightning-dropout best`` writes, or a mapping) instead of ``rules``; or a plan provider, a callable
            that takes the LightningModule and returns the plan: it is called once, in the first ``setup``, on
            global rank 0 only, and its plan is broadcast to every rank (the tuner samples a trial's plan from
            the freshly built model this way; under DDP every rank applies the same plan).
        schedule: a :class:`~lightning_dropout.schedules.Schedule` for every schedulable site, or a mapping
            from site globs (matched against ``"<target>:<where>"`` keys, e.g. ``"encoder.*"``) to schedules;
            the first matching glob wins. Learned (``concrete``) sites are never scheduled.
        log_rates: log each site's current rate as ``dropout/rate/<site>`` (learned rates of ``concrete``
            sites as ``dropout/learned/<site>``) and their mean as ``dropout/mean_rate``: rates that can change
            from step to step (a ``unit="step"`` schedule, learned rates) every ``log_every_n_steps``, the others
            (constant, or on an epoch schedule) once per epoch, straight to the loggers; with a TensorBoard
            logger, also write a "Custom Scalars" layout that puts the sites of a group (see
            :func:`~lightning_dropout.scalars.site_groups`) on one chart per quantity.
        track_drop_fraction: also measure and log the fraction of units each site actually dropped
            (``dropout/fraction/<site>``); costs one reduction per site and step.
        use_example_input: when the module sets ``example_input_array``, use it to check that each variant
            fits the shape its site sees (naming the site otherwise) and to find the output layer by
            execution order.
        dropout_seed: draw every variant's masks from a dedicated ``torch.Generator`` seeded with
            ``dropout_seed + global_rank`` instead of the global generator, so runs that differ only in their
            dropout see the same later random draws (initialization of lazily built layers, data order,
            augmentation): common random numbers for comparing plans. Its state is checkpointed. The float
            dropout of attention and RNN kernels (``where="attribute"``) cannot take a generator.
        eager: when a non-standard variant replaces a dropout module that a fused attention kernel bypasses
            (timm ``fused_attn``, Hugging Face SDPA read its ``.p``), switch that attention to its eager path
            instead of refusing the site (see :func:`~lightning_dropout.injection.apply_plan`).
        name: tells several injectors on one Trainer apart (e.g. one for the encoder, one for the head): each
            needs its own ``name``, which keys its checkpoint state (:attr:`state_key`) and its
            ``dropout/<name>/mean_rate``. Each injector owns the sites of its own rules or plan (schedules, rate
            logging and its mask generator act on those only); two injectors may not claim the same site.
            ``None`` (one injector) keeps the plain ``DropoutInjector`` state key.

    Example:
        >>> from torch import nn
        >>> from lightning_dropout.schedules import EarlyDropout
        >>> DropoutInjector(rules=[Rule(match=nn.Linear, p=0.1)], schedule=EarlyDropout(cutoff=5))
        DropoutInjector(rules=1, schedule=EarlyDropout(unit='epoch', cutoff=5, mode='constant'))
    """

    def __init__(
        self,
        rules: Sequence[Rule] | Rule | None = None,
        plan: DropoutPlan | str | Path | Mapping[str, Any] | PlanProvider | None = None,
        schedule: Schedule | Mapping[str, Schedule] | None = None,
        log_rates: bool = True,
        track_drop_fraction: bool = False,
        use_example_input: bool = True,
        dropout_seed: int | None = None,
        eager: bool = False,
        name: str | None = None,
    ) -> None:
        if (rules is None) == (plan is None):
            raise DropoutConfigError(
                "DropoutInjector needs exactly one of `rules` and `plan`, but got "
                f"rules={'given' if rules is not None else None}, plan={'given' if plan is not None else None}."
            )
        self.rules = as_rules(rules) if rules is not None else None
        self._provider: PlanProvider | None = None
        self._given_plan: DropoutPlan | None = None
        if callable(plan) and not isinstance(plan, DropoutPlan):
            self._provider = plan
        elif plan is not None:
            self._given_plan = as_plan(plan)
        bad_mapping = isinstance(schedule, Mapping) and not all(
            isinstance(s, Schedule) for s in schedule.values()
        )
        if (schedule is not None and not isinstance(schedule, (Schedule, Mapping))) or bad_mapping:
            raise DropoutConfigError(
                f"`schedule` must be a Schedule or a mapping of site globs to Schedules, but got {schedule!r}."
            )
        self.schedule = schedule
        self.log_rates = bool(log_rates)
        self.track_drop_fraction = bool(track_drop_fraction)
        self.use_example_input = bool(use_example_input)
        if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)):
            raise DropoutConfigError(f"`dropout_seed` must be an integer or None, but got {dropout_seed=!r}.")
        self.dropout_seed = dropout_seed
        self.eager = bool(eager)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise DropoutConfigError(f"`name` must be a non-empty string or None, but got name={name!r}.")
        self.name = name
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._global_rng: dict[str, Any] | None = None  # from a checkpoint, restored at the next epoch start
        self.plan: DropoutPlan | None = None
        self._handles: list[SiteHandle] = []
        self._schedules: list[tuple[SiteHandle, Schedule, float]] = []
        self._per_step: list[SiteHandle] = []  # sites whose rate may change between steps
        self._site_schedules: list[SiteHandle] = []  # sites with their own schedule in the plan (`rates`)

    def __repr__(self) -> str:
        what = (
            f"rules={len(self.rules)}"
            if self.rules is not None
            else f"plan={len(self._given_plan)} sites"
            if self._given_plan is not None
            else "plan=provided"
        )
        named = f"name={self.name!r}, " if self.name is not None else ""
        return f"{type(self).__name__}({named}{what}, schedule={self.schedule!r})"

    @property
    @override
    def state_key(self) -> str:
        """The key of this injector's state in a checkpoint: ``DropoutInjector``, or with a ``name``
        ``DropoutInjector{'name': ...}`` (so several injectors can be saved and restored side by side)."""
        return self._generate_state_key(name=self.name) if self.name is not None else super().state_key

    # -- setup: the injection itself ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if is_overridden("configure_model", pl_module):
            log.debug("calling %s.configure_model() before injecting", type(pl_module).__name__)
            pl_module.configure_model()
        if self._provider is not None and self._given_plan is None:
            # only rank 0 asks the provider (it may talk to a study); every rank applies the plan it chose,
            # sent as a plain dict (pickled by the broadcast; a single process keeps the plan itself)
            chosen = self._provider(pl_module) if trainer.is_global_zero else None
            if trainer.world_size > 1:
                sent = trainer.strategy.broadcast(chosen.to_dict() if chosen is not None else None, src=0)
                chosen = DropoutPlan.from_dict(sent)
            assert chosen is not None
            self._given_plan = chosen
        already = self.plan
        self._check_shared_sites(trainer, pl_module)
        self.inject(pl_module)
        if already != self.plan and self.plan is not None and trainer.is_global_zero:
            table = format_sites(describe(pl_module, self._example(pl_module), existing=False))
            rank_zero_info(
                f"lightning-dropout: {len(self.plan)} dropout sites (plan {self.plan.digest()})\n{table}"
            )

    def own_plan(self, pl_module: pl.LightningModule) -> DropoutPlan:
        """The sites this injector's rules (resolved against ``pl_module``) or plan put in the model."""
        if self._given_plan is None and self._provider is not None:  # called outside a Trainer
            self._given_plan = self._provider(pl_module)
        if self._given_plan is not None:
            return self._given_plan
        return resolve(pl_module, self.rules or [], self._example(pl_module), eager=self.eager)

    def _check_shared_sites(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a site another DropoutInjector of the trainer already applied (the later one would silently
        re-apply it with its own settings, and both would schedule and log it)."""
        others = [
            c
            for c in trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning
            if isinstance(c, DropoutInjector) and c is not self and c.plan is not None
        ]
        if not others:
            return
        mine = {site.key for site in self.own_plan(pl_module)}
        for other in others:
            shared = sorted(mine & {site.key for site in other.plan or ()})
            if shared:
                raise DropoutConfigError(
                    f"each dropout site must belong to one DropoutInjector, but {shared} are claimed by both "
                    f"{other.state_key} and {self.state_key}; narrow their rules (e.g. `name`/`exclude` globs)."
                )

    def inject(self, pl_module: pl.LightningModule) -> DropoutPlan:
        """Apply this callback's rules or plan to ``pl_module`` now (``setup`` calls it); returns the plan of
        this injector's own sites (other injectors' sites on the same model are left to them)."""
        own = self.own_plan(pl_module)
        inject(pl_module, plan=own, example_input=self._example(pl_module), eager=self.eager)
        self.plan = own
        keys = {site.key for site in own}
        self._handles = [h for h in site_handles(pl_module) if h.site.key in keys]
        for handle in self._handles:
            if handle.module is not None:
                handle.module.track = self.track_drop_fraction
        self._schedules = bind_schedules(self.schedule, self._handles)
        self._site_schedules = [h for h in self._handles if h.site.rates]
        both = sorted(
            {h.site.key for h, _, _ in self._schedules} & {h.site.key for h in self._site_schedules}
        )
        if both:
            raise DropoutConfigError(
                f"a site follows either its plan's rate schedule (`rates`) or the injector's `schedule`, but "
                f"{both} have both; leave those sites out of `schedule`."
            )
        stepped = {id(handle) for handle, schedule, _ in self._schedules if schedule.unit == "step"}
        self._per_step = [
            h for h in self._handles if id(h) in stepped or isinstance(h.module, ConcreteDropout)
        ]
        if any(isinstance(h.module, ConcreteDropout) for h in self._handles):
            if not pl_module.automatic_optimization:
                raise DropoutConfigError(
                    "concrete dropout adds its regularizer to the loss `training_step` returns, which needs "
                    "automatic_optimization=True; with manual optimization add "
                    "`regularization(self)` (from `lightning_dropout.injection`) to your loss yourself."
                )
            if not isinstance(pl_module.__dict__.get("training_step"), _RegularizedTrainingStep):
                pl_module.training_step = _RegularizedTrainingStep(pl_module)  # type: ignore[method-assign]
        return self.plan

    def _example(self, pl_module: pl.LightningModule) -> Any:
        example = getattr(pl_module, "example_input_array", None) if self.use_example_input else None
        return example.to(pl_module.device) if isinstance(example, Tensor) else example

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(pl_module.__dict__.get("training_step"), _RegularizedTrainingStep):
            del pl_module.training_step

    # -- fit start: learned rates must be optimized -------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dropout_seed is not None:
            self._generator = torch.Generator(device=pl_module.device)
            self._generator.manual_seed(self.dropout_seed + trainer.global_rank)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
            for handle in self._handles:
                if handle.module is not None:
                    handle.module.generator = self._generator
        self._check_learned_rates(trainer, pl_module)
        self._write_layout(trainer)

    def _check_learned_rates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        learned = {id(p): n for n, p in pl_module.named_parameters() if n.endswith("p_logit")}
        concrete = [h for h in self._handles if isinstance(h.module, ConcreteDropout)]
        if not concrete:
            return
        visible = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = sorted(name for pid, name in learned.items() if pid not in visible)
        frozen = sorted(
            n for n, p in pl_module.named_parameters() if n.endswith("p_logit") and not p.requires_grad
        )
        if missing or frozen:
            raise DropoutConfigError(
                "concrete dropout learns its rate, so its `p_logit` must be a trainable parameter of an optimizer, "
                f"but {missing or frozen} {'are not in any optimizer' if missing else 'do not require grad'}; build "
                "the optimizer from `self.parameters()` (the sites are injected before `configure_optimizers`)."
            )

    # -- schedules and logging ---------------------------------------------------------------------------------
    def _apply_schedule(self, trainer: pl.Trainer, unit: str) -> None:
        for handle, schedule, base in self._schedules:
            if schedule.unit != unit:
                continue
            total: int | float | None
            if unit == "step":
                t, total = trainer.global_step, trainer.estimated_stepping_batches
            else:
                t, total = trainer.current_epoch, trainer.max_epochs
            total_f = float(total) if total not in (None, -1) and total != float("inf") else None
            handle.set_rate(base * schedule.factor(t, total_f))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._global_rng is not None:  # resumed: continue the random stream the checkpoint left off
            _set_global_rng(self._global_rng)
            self._global_rng = None
        self._apply_schedule(trainer, "epoch")
        for handle in self._site_schedules:  # the plan's own rates by epoch (e.g. a replayed PBT schedule)
            handle.set_rate(handle.site.rate_at(trainer.current_epoch))
        self._log_epoch_rates(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply_schedule(trainer, "step")

    @property
    def _mean_tag(self) -> str:
        return f"{LOG_PREFIX}/{self.name}/mean_rate" if self.name is not None else f"{LOG_PREFIX}/mean_rate"

    def _log_epoch_rates(self, trainer: pl.Trainer) -> None:
        """The rates that cannot change within the epoch, once, at its start, straight to the loggers: a constant
        rate needs no per-step scalar (``self.log`` costs a result-collection update per call and step)."""
        if not (self.log_rates and self._handles and trainer.is_global_zero and trainer.loggers):
            return
        per_step = {id(h) for h in self._per_step}
        values = {rate_tag(h, "rate"): h.rate for h in self._handles if id(h) not in per_step}
        if not per_step:
            values[self._mean_tag] = sum(values.values()) / len(values)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_rates or not (self._per_step or self.track_drop_fraction):
            return
        if batch_idx % max(trainer.log_every_n_steps, 1) != 0:  # type: ignore[attr-defined]  # set by Lightning
            return
        for handle in self._per_step:
            pl_module.log(rate_tag(handle, "rate"), handle.rate, on_step=True, on_epoch=False)
        if self.track_drop_fraction:
            for handle in self._handles:
                fraction = handle.module.drop_fraction if handle.module is not None else None
                if fraction is not None:
                    pl_module.log(rate_tag(handle, "fraction"), fraction, on_step=True, on_epoch=False)
        if self._per_step:  # the mean moves with them
            mean = sum(h.rate for h in self._handles) / len(self._handles)
            pl_module.log(self._mean_tag, mean, on_step=True, on_epoch=False)

    def _write_layout(self, trainer: pl.Trainer) -> None:
        """TensorBoard "Custom Scalars": one chart per quantity and group of similar sites, all sites of a group
        as lines of that chart (readable with 50 sites); a named injector's charts have their own category
        (``dropout/<name>``), added to the layout the other injectors wrote."""
        if not (self.log_rates and self._handles and trainer.is_global_zero):
            return
        category = f"{LOG_PREFIX}/{self.name}" if self.name is not None else LOG_PREFIX
        charts = scalar_layout(self._handles, self.track_drop_fraction)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                write_layout(logger.experiment, category, charts)

    # -- checkpoints -------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"plan": self.plan.to_dict() if self.plan is not None else None}
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        # the global generator draws the masks when `dropout_seed` is None (and always for the sites that
        # cannot take a generator): saved so that a resumed fit draws what an uninterrupted one would
        state["global_rng"] = _global_rng()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._generator_state = state_dict.get("generator")
        self._global_rng = state_dict.get("global_rng")
        saved = DropoutPlan.from_dict(state_dict.get("plan"))
        if self.plan is not None and saved != self.plan:
            rank_zero_warn(
                f"the checkpoint was trained with dropout plan {saved.digest()} ({len(saved)} sites) but this "
                f"DropoutInjector applied plan {self.plan.digest()} ({len(self.plan)} sites); training continues "
                "with the current plan. Pass `plan=` the checkpoint's plan to resume it exactly."
            )


def _global_rng() -> dict[str, Any]:
    """torch's global random states (CPU, and every CUDA device once CUDA is initialized)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
