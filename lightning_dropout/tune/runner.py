"""Running a study: one Optuna trial = one training run with a sampled dropout plan (the Optuna layer).

``tune`` parses the config once (failing fast on any bad key), opens or creates the study in its storage,
enqueues the baselines, and runs trials in ``workers`` processes that share the storage. Each trial:

1. seeds everything with ``study.seed`` (same initialization and data order for every trial);
2. builds a fresh model, datamodule and trainer from the config;
3. samples a plan (define-by-run, :func:`~lightning_dropout.tune.space.suggest_plan`) or takes its baseline plan;
4. trains with ``DropoutInjector(plan=...)`` and :class:`TrialPruning`, which reports the metric after every
   validation and stops the run when the pruner says so;
5. stores its plan (YAML), its metrics and, on failure, the reason on the trial.

Failed trials (an exception, a NaN metric) are recorded with their reason and the study goes on. With an RDB
storage a heartbeat marks trials of a killed worker as failed and re-queues them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import optuna
import torch
import yaml
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from optuna.trial import TrialState

from lightning_dropout.callback import DropoutInjector
from lightning_dropout.config import ConfigCLI, load_config, quiet_lightning
from lightning_dropout.errors import DropoutConfigError, UnwritableError, unwritable
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.redaction import redact
from lightning_dropout.tune import ctrl_c, trial_io
from lightning_dropout.tune.board import Columns, study_columns, trial_hparams
from lightning_dropout.tune.budget import BudgetPlan
from lightning_dropout.tune.checks import (
    check_enqueue,
    check_groups,
    check_no_injector,
    check_no_plan,
    check_run_dir,
)
from lightning_dropout.tune.config import CONFIG_SECTIONS, DropoutSpace, StudyConfig, make_pruner
from lightning_dropout.tune.devices import DeviceLayout, divide, trial_port, visible_gpus
from lightning_dropout.tune.fixed import baseline_plans, duplicate_of, enqueue_fixed, race_references
from lightning_dropout.tune.loggers import (
    check_loggers,
    finish_loggers,
    logger_specs,
    open_parent_runs,
    trial_loggers,
)
from lightning_dropout.tune.monitors import TrialMonitors
from lightning_dropout.tune.pruning import MetricNotLoggedError, TrialPruning
from lightning_dropout.tune.records import (
    BASELINE_ATTR,
    CONFIG_ATTR,
    CONFIG_SUMMARY_PREFIX,
    DUPLICATE,
    EPOCHS_ATTR,
    FAIL_ATTR,
    FIXED_PLAN_ATTR,
    INTERRUPTED,
    METRIC_ATTR,
    METRICS_ATTR,
    NOTHING_TRAINED,
    PLAN_ATTR,
    SEARCH_ATTR,
    STEPS_METRIC,
    VALUE_RULE_ATTR,
    WINNER_RULE_ATTR,
    config_summary,
    fail_stale,
    finished_trials,
    fixed_label,
    name_objective,
    open_storage,
    repeated_failure,
)
from lightning_dropout.tune.search import Distribution, parse_search, search_values
from lightning_dropout.tune.seeding import seeded_sampler
from lightning_dropout.tune.space import suggest_plan
from lightning_dropout.tune.value import trial_value

__all__ = ["DuplicateTrialError", "TrialResult", "Tuner"]

log = logging.getLogger(__name__)


class DuplicateTrialError(RuntimeError):
    """A fixed trial that an earlier trial with the same label already covers (recorded as failed, not run)."""


@dataclass
class TrialResult:
    """What one training run produced."""

    value: float | None
    metrics: dict[str, float]
    pruned: bool

    def diverged(self) -> list[str]:
        """The loss metrics that became NaN."""
        return sorted(k for k, v in self.metrics.items() if "loss" in k and math.isnan(v))

    def trained(self) -> bool:
        """Whether one optimizer step ran (``max_epochs: 0`` or ``limit_train_batches: 0`` train nothing)."""
        return self.metrics.get(STEPS_METRIC, 1.0) > 0

    def state(self) -> str:
        """``pruned``, ``failed`` (nothing trained, no finite value of the metric, or a NaN loss) or
        ``complete``."""
        if self.pruned:
            return "pruned"
        if not self.trained() or self.value is None or math.isnan(self.value) or self.diverged():
            return "failed"
        return "complete"


def fit(cli: ConfigCLI, ckpt_path: str | None = None) -> None:
    """``cli.trainer.fit`` as a trial runs it: quiet, stopped at once by a Ctrl-C (:func:`ctrl_c.allowed`), and
    Lightning's own Ctrl-C exit (``sys.exit(1)``) turned back into ``KeyboardInterrupt``, so Optuna records the
    trial as interrupted and the study stops."""
    with quiet_lightning(), ctrl_c.allowed():
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        except SystemExit as exit_:
            if cli.trainer.interrupted:
                raise KeyboardInterrupt from exit_
            raise


class Tuner:
    """Runs trials for one parsed tuning config.

    Args:
        args: the config as CLI arguments (``["--config", "study.yaml", overrides...]``); re-parsed in each
            worker process, so workers need nothing but this list.
    """

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        # no per-trial config.yaml: it would repeat the study's storage URL, password included, on disk
        self.cli: ConfigCLI = load_config(
            self.args, instantiate=False, save_config=False, sections=CONFIG_SECTIONS
        )
        init = self.cli.fresh().config_init  # every class in the file is built once here: fail before trial 0
        self._fatal: DropoutConfigError | None = None
        self._launched_failure: RuntimeError | None = None  # a failed trial under torchrun/srun ends the job
        self._columns: Columns | None = None
        self._budget: BudgetPlan | None = None
        self._layout: DeviceLayout | None = None
        # under torchrun/srun, on global rank 0: where each job goes to the other ranks (tune/launched.py)
        self.channel: Any = None
        self.study_config: StudyConfig = init["study"]
        self.space: DropoutSpace = init["dropout"]
        if not self.space.groups:
            raise DropoutConfigError(
                "`dropout.groups` must list at least one group of sites to search, but the config has none."
            )
        check_run_dir(self.study_config.run_dir)
        check_no_injector(self.cli.trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning
        check_no_plan(self.cli.config.get("plan"))
        # the config's own loggers, rebuilt per run with the run's identity (checked here, before trial 0)
        self.logger_specs = logger_specs(self.cli.config["trainer"]["logger"])
        check_loggers(self.logger_specs)
        example = getattr(self.cli.model, "example_input_array", None)
        check_groups(self.space.groups, self.cli.model, example)
        _ = self.budget  # a budget needs trainer.max_epochs: fail before trial 0
        self.search: dict[str, Distribution] = parse_search(self.cli.config.get("search"), self.cli.config)
        check_enqueue(self.study_config.enqueue, self.space.groups, self.cli.model, example)

    def pin_threads(self) -> int:
        """Set this process's torch threads to ``study.threads`` (see
        :meth:`~lightning_dropout.tune.config.StudyConfig.torch_threads`); return the number."""
        threads = self.study_config.torch_threads()
        torch.set_num_threads(threads)
        return threads

    # -- workers and their GPUs -------------------------------------------------------------------------------
    def place_workers(self) -> DeviceLayout:
        """Where this ``tune`` run's workers go (:mod:`~lightning_dropout.tune.devices`), decided once, in the
        ``tune`` process, before trial 0: resolves ``study.workers: auto`` to a number (stored back on
        :attr:`study_config`) and gives each worker its ``trainer.devices`` GPUs of ``study.devices`` (default:
        every visible GPU when the trainer runs on CUDA). Raises :class:`DropoutConfigError` when they do not
        fit."""
        if self._layout is not None:
            return self._layout
        from lightning.pytorch.accelerators import CUDAAccelerator

        cfg = self.study_config
        trainer = self.cli.trainer
        per_trial = max(1, int(trainer.num_devices))
        gpus = cfg.gpu_list()
        on_cuda = isinstance(trainer.accelerator, CUDAAccelerator)
        ids = list(getattr(trainer, "device_ids", range(per_trial)))
        # GPU ids in the config (`trainer.devices: [2, 3]`) pick the GPUs of one worker: nothing to divide
        if on_cuda and ids != list(range(per_trial)) and (cfg.workers != 1 or gpus is not None):
            raise DropoutConfigError(
                f"`trainer.devices` must be a number of GPUs when `study.workers` is not 1 or "
                f"`study.devices` is set (each worker gets its own GPUs), but got the GPU ids {ids}; write "
                f"trainer.devices: {per_trial} and study.devices: {ids}."
            )
        source = "the GPUs of `study.devices`"
        if gpus is None and on_cuda and cfg.workers != 1:  # one worker alone keeps Lightning's choice
            gpus, source = visible_gpus(), "the visible GPUs (`study.devices` unset)"
        layout = divide(gpus, per_trial, cfg.workers, threads=cfg.torch_threads(), source=source)
        cfg.workers = layout.workers
        self._layout = layout
        return layout

    # -- budget ----------------------------------------------------------------------------------------------
    @property
    def max_epochs(self) -> int | None:
        """``trainer.max_epochs`` of the config (``None`` when it sets none)."""
        epochs = self.cli.config["trainer"].get("max_epochs")
        return int(epochs) if isinstance(epochs, int) and epochs > 0 else None

    @property
    def budget(self) -> BudgetPlan | None:
        """How the study fits ``study.budget`` (:mod:`~lightning_dropout.tune.budget`); ``None`` without one."""
        cfg = self.study_config
        if cfg.budget is None:
            return None
        if self._budget is None:
            if self.max_epochs is None:
                raise DropoutConfigError(
                    f"`study.budget` counts trainings of `trainer.max_epochs` epochs, but the config sets no "
                    f"positive trainer.max_epochs (got {self.cli.config['trainer'].get('max_epochs')!r}); set it, "
                    "or drop `study.budget` and set `study.n_trials`."
                )
            references = race_references(cfg, self.cli.fresh().model)
            assert cfg.top_k is not None and cfg.seeds is not None  # resolved by StudyConfig
            self._budget = BudgetPlan.make(cfg.budget, self.max_epochs, references, cfg.top_k, cfg.seeds)
        return self._budget

    # -- storage ---------------------------------------------------------------------------------------------
    @property
    def storage_url(self) -> str:
        return self.study_config.storage_url()

    def storage(self) -> optuna.storages.BaseStorage:
        return open_storage(self.storage_url)

    def study(self) -> optuna.Study:
        """Open (or create) the study. The sampler draws each trial from its own stream, seeded from the trial
        number (:mod:`~lightning_dropout.tune.seeding`): a resumed study, a second worker or a joining machine
        never replays the proposals of earlier trials, and a fresh study is reproducible. A Ctrl-C during these
        storage writes is raised once they are done (one landing inside a driver's transaction breaks it)."""
        with ctrl_c.held():
            return self._open_study()

    def _open_study(self) -> optuna.Study:
        cfg = self.study_config
        study = optuna.create_study(
            study_name=cfg.name,
            storage=self.storage(),
            sampler=seeded_sampler(cfg.sampler, cfg.seed),
            pruner=make_pruner(cfg.pruner),
            direction=cast(Literal["minimize", "maximize"], cfg.direction),
            load_if_exists=True,
        )
        name_objective(study, cfg.metric)  # Optuna's own tools name the objective (optuna-dashboard)
        # `best` and `report` need nothing but the storage
        config = redact(self.cli.parser.dump(self.cli.config, skip_validation=True))
        # ... and optuna-dashboard shows it readably, one line per section (computed when the config changed)
        summary = self._config_summary(study, config) if study.user_attrs.get(CONFIG_ATTR) != config else {}
        for key, value in (
            (METRIC_ATTR, cfg.metric),
            (WINNER_RULE_ATTR, cfg.winner),
            (VALUE_RULE_ATTR, cfg.value),
            (CONFIG_ATTR, config),
            *summary.items(),
        ):
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        open_parent_runs(self.logger_specs, study)  # MLflow: the study's parent run, kept in the storage
        return study

    def _config_summary(self, study: optuna.Study, config: str) -> dict[str, str]:
        """The ``config/<section>`` study attributes of ``config`` (the dumped YAML, redacted; see
        :func:`~lightning_dropout.tune.records.config_summary`); a section an earlier config had and this one
        has not becomes ``-``."""
        try:
            dumped = self.cli.parser.dump(self.cli.parser.get_defaults(), skip_validation=True)
            defaults = yaml.safe_load(redact(dumped)) or {}
        except Exception as err:  # a parser whose defaults do not dump: every section then differs
            log.debug("config defaults unavailable: %s", err)
            defaults = {}
        summary = config_summary(yaml.safe_load(config) or {}, defaults)
        gone = {k: "-" for k in study.user_attrs if k.startswith(CONFIG_SUMMARY_PREFIX) and k not in summary}
        return {**gone, **summary}

    # -- one run -----------------------------------------------------------------------------------------------
    def train(
        self,
        plan: DropoutPlan | Callable[[torch.nn.Module], DropoutPlan],
        trial: optuna.Trial | None,
        seed: int,
        version: str,
        kind: str = "trial",
        number: int | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> tuple[TrialResult, DropoutPlan]:
        """Train one model with ``plan`` (or a function of the fresh model giving one) and return its metrics.

        The run is logged through the config's own loggers with ``version`` as its identity, or to TensorBoard
        as ``<run_dir>/<study>/trials/<version>`` (re-runs: ``reruns/<version>``; see ``tune.loggers``), and ends
        with one record (the plan over the study's fixed site columns, the best value, the gap at the best epoch and the
        state; TensorBoard's HParams), whatever the outcome. ``kind`` (``trial``/``rerun``) and ``number`` (the
        study trial it belongs to) label that record; ``values`` are the ``search:`` values set in the config for
        this run."""
        cfg = self.study_config
        pl.seed_everything(seed, workers=True, verbose=False)
        fixed = trial is not None and fixed_label(trial) is not None
        pruning = TrialPruning(trial, cfg.metric, cfg.direction, cfg.prune_after, prunable=not fixed)
        injector = DropoutInjector(plan=plan, dropout_seed=cfg.dropout_seed)
        monitors = TrialMonitors(cfg)
        number = trial.number if trial is not None else number
        loggers = trial_loggers(self.logger_specs, Path(cfg.run_dir), cfg.name, version, kind, number)
        cli = self.cli.fresh(
            [injector, *monitors.callbacks, pruning],
            values=values,
            logger=loggers or False,
            enable_checkpointing=self.cli.asks_for_checkpoints(),  # no .ckpt per run unless asked
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        columns = self.hparam_columns(cli.model)
        result: TrialResult | None = None
        try:
            fit(cli)
            metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
            best = pruning.best_index()
            metrics["best_value"] = math.nan if best is None else pruning.history[best]
            value = trial_value(pruning.history, cfg.value, pruning.maximize, cfg.value_window)
            metrics["value"] = value
            metrics[EPOCHS_ATTR] = float(cli.trainer.current_epoch)  # the compute it used (tune/budget.py)
            metrics[STEPS_METRIC] = float(cli.trainer.global_step)
            if best is not None:
                metrics["best_epoch"] = float(pruning.epochs[best])
            metrics.update(monitors.at_best(best))
            result = TrialResult(None if best is None else value, metrics, pruning.pruned)
        finally:
            params: dict[str, Any] = {
                "trial": -1 if number is None else number,
                "kind": kind,
                "seed": seed,
                "baseline": str(trial.user_attrs.get(BASELINE_ATTR, "-")) if trial is not None else "-",
                "state": "failed" if result is None else result.state(),
            }
            chosen = injector.plan if injector.plan is not None else DropoutPlan()
            params.update(trial_hparams(chosen, columns, trial.params if trial is not None else {}))
            params.update({f"search/{k}": v for k, v in (values or {}).items()})
            if cli.trainer.global_rank == 0:  # the others' loggers write nothing (Lightning's rank-zero rule)
                finish_loggers(loggers, params, self._hparam_metrics(result, monitors))
        assert injector.plan is not None and result is not None  # set in setup() / after fit
        return result, injector.plan

    def hparam_columns(self, model: torch.nn.Module) -> Columns:
        """The study's HParams dropout columns, resolved on the first (fresh) model and kept: every trial builds
        the same model from the same config."""
        if self._columns is None:
            try:
                self._columns = study_columns(
                    self.space.groups, model, getattr(model, "example_input_array", None)
                )
            except Exception as err:  # a model only the injector's configure_model builds: plan keys only
                log.debug("HParams site columns from the plan only: %s", err)
                self._columns = Columns()
        return self._columns

    def _hparam_metrics(self, result: TrialResult | None, monitors: TrialMonitors) -> dict[str, float]:
        """The HParams metrics, the same keys for every run of the study (NaN when unknown)."""
        metrics = result.metrics if result is not None else {}
        return {
            f"hp/best_{self.study_config.metric}": metrics.get("best_value", math.nan),
            "hp/best_epoch": metrics.get("best_epoch", math.nan),
            "hp/value": metrics.get("value", math.nan),
            **monitors.hparam_metrics(metrics),
        }

    @property
    def multiprocess(self) -> bool:
        """Whether a trial's trainer re-launches its script per rank (``strategy: ddp`` on several devices, the
        ranks not started by a cluster launcher), read off the Trainer the config builds (whatever form the strategy and devices were given in)."""
        trainer = self.cli.trainer
        env = getattr(trainer.strategy, "cluster_environment", None)
        if (
            env is not None and env.creates_processes_externally
        ):  # torchrun/srun started the ranks (launched.py)
            return False
        return isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.world_size > 1

    def run_trial(
        self, trial: optuna.Trial | None, values: Mapping[str, Any] | None = None
    ) -> tuple[TrialResult, DropoutPlan]:
        """Train the trial's plan in this process, with the ``search:`` ``values`` chosen for it. Under DDP only
        rank 0 has the ``trial``; the others get ``None`` and receive the plan and the pruning decisions by
        broadcast (and the values from the study process)."""
        baseline = trial.user_attrs.get(BASELINE_ATTR) if trial is not None else None

        def choose(model: torch.nn.Module) -> DropoutPlan:  # called on rank 0 only
            assert trial is not None
            if baseline is not None:
                return baseline_plans(model)[baseline]
            if FIXED_PLAN_ATTR in trial.user_attrs:
                return DropoutPlan.from_yaml(trial.user_attrs[FIXED_PLAN_ATTR])
            example = getattr(model, "example_input_array", None)
            return suggest_plan(trial, self.space.groups, model, example)

        number = trial.number if trial is not None else 0
        return self.train(choose, trial, self.study_config.seed, version=f"trial_{number:04d}", values=values)

    def _in_subprocess(self, name: str, job: dict[str, Any]) -> tuple[TrialResult, DropoutPlan]:
        """Run one training job as its own process (``python -m lightning_dropout.tune.trial``), which
        Lightning's ``ddp`` launcher re-runs once per rank: the study loop itself never runs twice. For a trial,
        rank 0 rebuilds it from the storage by id, samples, reports and prunes; the plan and the pruning
        decisions are broadcast to the other ranks."""
        workdir = Path(self.study_config.run_dir) / self.study_config.name / "trial_io"
        spec, out = workdir / f"{name}.json", workdir / f"{name}.result.json"
        # the config arguments (the storage URL, password included) go by environment, never into a file
        env = trial_io.write_spec(spec, out, job, self.args)
        cmd = [sys.executable, "-m", "lightning_dropout.tune.trial", str(spec)]
        threads = str(self.study_config.torch_threads())  # every rank's process: its own share, no more
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        # each trial its own rendezvous on this machine, safe beside other workers' trials: an inherited
        # MASTER_PORT (a scheduler's, or one Lightning left in this process) would be shared by all of them
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(trial_port()))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        data = trial_io.read_result(out)
        if data is None:
            tail = redact((proc.stderr or proc.stdout)[-1500:])
            raise RuntimeError(f"trial process exited with {proc.returncode} and no result: {tail}")
        if data.get("fatal"):
            raise MetricNotLoggedError(data["fatal"])
        if data.get("error"):
            raise RuntimeError(data["error"])
        return TrialResult(data["value"], data["metrics"], data["pruned"]), DropoutPlan.from_yaml(
            data["plan"]
        )

    def run_plan(
        self,
        plan: DropoutPlan,
        seed: int,
        version: str,
        number: int | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> TrialResult:
        """Train a fixed plan with ``seed`` and the ``search:`` ``values`` (a re-run of trial ``number``), in its
        own process when the trainer is multi-process."""
        job = {"plan": plan.to_yaml(), "seed": seed, "version": version, "number": number}
        job["values"] = dict(values or {})
        if self.multiprocess:
            return self._in_subprocess(version, job)[0]
        if self.channel is not None:
            self.channel.send({"kind": "rerun", **job})
        return self.train(plan, None, seed, version, kind="rerun", number=number, values=values)[0]

    def train_rerun(self, job: Mapping[str, Any]) -> tuple[TrialResult, DropoutPlan]:
        """Train, in this process, the re-run ``job`` that :meth:`run_plan` hands to another process (a trial
        process's job file, or what rank 0 sends the other ranks of a launched trainer)."""
        return self.train(
            DropoutPlan.from_yaml(job["plan"]),
            None,
            job["seed"],
            job["version"],
            kind="rerun",
            number=job.get("number"),
            values=job.get("values"),
        )

    def objective(self, trial: optuna.Trial) -> float:
        """Train ``trial`` and return its value (Optuna's objective); a full disk or a read-only storage stops
        the study, since every further trial would fail alike and could not even record why."""
        try:
            return self._objective(trial)
        except Exception as err:
            if unwritable(err) is not None:
                self._fatal = self.unwritable_error(err)
                trial.study.stop()
            raise

    def _objective(self, trial: optuna.Trial) -> float:
        cfg = self.study_config
        twin = duplicate_of(trial)
        if twin is not None:  # enqueued twice by two processes starting at once: the earlier one runs
            trial.set_user_attr(FAIL_ATTR, DUPLICATE)
            raise DuplicateTrialError(f"trial {trial.number} duplicates trial {twin}; not run")
        try:
            # suggested here, in the study process, before any model is built: every rank gets the same values
            values = search_values(trial, self.search, self.cli.config, fixed=fixed_label(trial) is not None)
            if values:
                trial.set_user_attr(SEARCH_ATTR, values)
            if self.channel is not None:  # the other ranks of a launched multi-node trainer train it too
                self.channel.send({"kind": "trial", "number": trial.number, "values": values})
            if self.multiprocess:
                name = f"trial_{trial.number:04d}"
                result, plan = self._in_subprocess(name, {"trial_id": trial._trial_id, "values": values})
            else:
                result, plan = self.run_trial(trial, values)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(FAIL_ATTR, INTERRUPTED)  # not counted towards n_trials: a re-run redoes it
            raise
        except Exception as err:
            trial.set_user_attr(FAIL_ATTR, f"{type(err).__name__}: {err}"[:2000])
            if isinstance(err, MetricNotLoggedError):  # every trial would fail alike: stop, then report it
                self._fatal = err
                trial.study.stop()
            else:
                log.warning("trial %d failed: %s", trial.number, redact(f"{type(err).__name__}: {err}")[:300])
            if self.channel is not None and self._fatal is None:
                # the other ranks of a multi-node trainer may wait in the failed training's next collective: end
                # the job (the launcher stops every rank), the trial recorded; running it again resumes
                self._launched_failure = RuntimeError(
                    f"trial {trial.number} failed on rank 0 of a multi-node trainer, so the other ranks cannot go "
                    "on: the job ends (start it again to resume the study)"
                )
                trial.study.stop()
            raise
        trial.set_user_attr(PLAN_ATTR, plan.to_yaml())
        trial.set_user_attr(METRICS_ATTR, result.metrics)
        if EPOCHS_ATTR in result.metrics:
            trial.set_user_attr(EPOCHS_ATTR, result.metrics[EPOCHS_ATTR])
        if result.pruned:
            raise optuna.TrialPruned("stopped by the pruner")
        diverged = result.diverged()
        if not result.trained():  # said before "diverged": a run that trained nothing did not diverge
            trial.set_user_attr(FAIL_ATTR, NOTHING_TRAINED)
            log.warning("trial %d failed: %s", trial.number, NOTHING_TRAINED)
            raise RuntimeError(NOTHING_TRAINED)
        if result.state() == "failed":
            reason = f"`{cfg.metric}` was NaN" if not diverged else f"{diverged} became NaN"
            trial.set_user_attr(FAIL_ATTR, f"{reason}: the training diverged")
            log.warning("trial %d failed: %s: the training diverged", trial.number, reason)
            raise FloatingPointError(reason)
        assert result.value is not None  # a complete trial has a finite value
        return result.value

    # -- the study ---------------------------------------------------------------------------------------------
    def enqueue_fixed(self, study: optuna.Study) -> None:
        """Enqueue, once per study, what runs before the sampler (:func:`~lightning_dropout.tune.fixed.enqueue_fixed`):
        the baselines, the warm-start grid and the user's own trials."""
        model = self.cli.fresh().model
        with ctrl_c.held():  # storage writes (see :meth:`study`)
            enqueue_fixed(study, self.study_config, self.space, model)

    def run_worker(self, index: int = 0, study: optuna.Study | None = None) -> None:
        """Run sampled trials until the study holds ``n_trials`` finished ones (or its budget is used); ``index``
        tells workers apart (worker 0 may pass the study it already opened). ``study.method: pbt`` runs the
        population's segments instead: :func:`~lightning_dropout.tune.workers.run_worker` chooses."""
        cfg = self.study_config
        self.pin_threads()
        study = study if study is not None else self.study()

        def full(study: optuna.Study, running: bool = True) -> bool:
            """Whether the budget or ``n_trials`` leaves no room for another trial; the trials other workers are
            running count too (``running``), so the workers do not all start the last one."""
            if self.budget is not None and self.budget.stalled(study):
                log.warning("the last trials all failed before training one epoch: no more trials start")
                return True
            if repeated_failure(study) is not None:  # a config reason: every further trial would fail alike
                return True
            if self.budget is not None and not self.budget.room_for_trial(study):
                return True
            if cfg.n_trials is None:
                return False
            busy = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) if running else 0
            return finished_trials(study) + busy >= cfg.n_trials

        def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if full(study):
                study.stop()

        deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
        with ctrl_c.held():  # Ctrl-C stops a training, not Optuna's bookkeeping (tune/ctrl_c.py)
            while not full(study, running=False):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                with self.stopping_on_full_disk():  # Optuna's own writes: a trial's start, its result
                    study.optimize(
                        self.objective,
                        n_trials=None,
                        timeout=left,
                        catch=(Exception,),
                        callbacks=[stop, ctrl_c.check],
                    )
                if self._fatal is not None:
                    raise self._fatal
                if self._launched_failure is not None:
                    raise self._launched_failure
                if not self._await_running(study):
                    break

    @contextlib.contextmanager
    def stopping_on_full_disk(self) -> Iterator[None]:
        """Turn a storage or file write that failed for lack of room (:func:`~lightning_dropout.errors.unwritable`)
        into the study's one-line :meth:`unwritable_error`; any other error passes through."""
        try:
            yield
        except Exception as err:
            if unwritable(err) is None:
                raise
            raise self.unwritable_error(err) from err

    def unwritable_error(self, err: BaseException) -> UnwritableError:
        """The one line for a study that cannot write its storage or its files any more."""
        filename = getattr(err, "filename", None)
        where = (
            f"`{filename}`"
            if filename
            else f"its storage ({redact(self.storage_url)}) or its run directory ({self.study_config.run_dir})"
        )
        return UnwritableError(
            f"the study stopped: it cannot write to {where}: {unwritable(err)}. What is stored is kept: make "
            "room (or make it writable) and run the same command to resume."
        )

    def _await_running(self, study: optuna.Study, poll: float = 1.0) -> bool:
        """Wait for the trials still running in the study before this worker leaves it, since they count as busy:
        a trial whose process was killed (kill -9, a lost machine) would stay RUNNING for good. Once its
        heartbeat is stale it is failed and Optuna queues its retry. True when a trial waits to be run (the
        worker runs it), False when nothing runs any more (or the storage has no heartbeat: a journal file)."""
        if self.storage_url.startswith("journal:"):
            return False
        while True:
            trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
            if not trials or any(t.state == TrialState.WAITING for t in trials):
                return bool(trials)
            ctrl_c.check()
            time.sleep(poll)
            fail_stale(study)
