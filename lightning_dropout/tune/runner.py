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

import logging
import math
import multiprocessing
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import optuna
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from optuna.trial import TrialState
from typing_extensions import override

from lightning_dropout.callback import DropoutInjector
from lightning_dropout.config import ConfigCLI, load_config, quiet_lightning
from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.inject import Rule, existing_rate, is_dropout_module, resolve
from lightning_dropout.monitor import GapMonitor, UncertaintyMonitor, metric_base_name
from lightning_dropout.plan import DropoutPlan
from lightning_dropout.tune import trial_io
from lightning_dropout.tune.board import TrialLogger, plan_columns, plan_hparams
from lightning_dropout.tune.checks import check_groups, check_no_injector, check_run_dir
from lightning_dropout.tune.config import DropoutSpace, StudyConfig, make_pruner, redact
from lightning_dropout.tune.pruning import MetricNotLoggedError, TrialPruning
from lightning_dropout.tune.records import (
    BASELINE_AS_WRITTEN,
    BASELINE_ATTR,
    BASELINE_NONE,
    ENQUEUED_ATTR,
    FAIL_ATTR,
    FIXED_PLAN_ATTR,
    INTERRUPTED,
    METRICS_ATTR,
    PLAN_ATTR,
    WARM_START_ATTR,
    candidates,
    finished_trials,
    name_objective,
    open_storage,
    plan_amount,
    rerun_candidates,
    stored_plan,
    trial_label,
)
from lightning_dropout.tune.seeding import seeded_sampler
from lightning_dropout.tune.selection import (
    UNIFORM_PREFIX,
    Candidate,
)
from lightning_dropout.tune.space import suggest_plan, uniform_params
from lightning_dropout.tune.value import trial_value

__all__ = ["TrialResult", "Tuner", "rerun", "rerun_seeds", "run_workers"]

log = logging.getLogger(__name__)


@dataclass
class TrialResult:
    """What one training run produced."""

    value: float | None
    metrics: dict[str, float]
    pruned: bool

    def diverged(self) -> list[str]:
        """The loss metrics that became NaN."""
        return sorted(k for k, v in self.metrics.items() if "loss" in k and math.isnan(v))

    def state(self) -> str:
        """``pruned``, ``failed`` (no finite value of the metric, or a NaN loss) or ``complete``."""
        if self.pruned:
            return "pruned"
        if self.value is None or math.isnan(self.value) or self.diverged():
            return "failed"
        return "complete"


def _baseline_plans(model: torch.nn.Module) -> dict[str, DropoutPlan]:
    """The baselines every study compares against: no dropout at all, and the model's own dropout as written
    (only when it has some: inert ``p=0`` slots, like those of the Transformer zoo model, do not count)."""
    if not _own_dropout(model) > 0:
        return {BASELINE_NONE: DropoutPlan()}
    off = resolve(model, [Rule(replace=True, p=0.0)])
    return {BASELINE_NONE: off, BASELINE_AS_WRITTEN: DropoutPlan()}


class _ChosenPlanInjector(DropoutInjector):
    """A DropoutInjector whose plan is chosen from the fresh model in ``setup`` (sampled by the trial, or a
    baseline), so the model is built once per trial."""

    def __init__(self, choose: Callable[[torch.nn.Module], DropoutPlan], dropout_seed: int | None) -> None:
        super().__init__(plan=DropoutPlan(), dropout_seed=dropout_seed)
        self._choose = choose
        self._chosen = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._chosen:
            # only rank 0 talks to the study; every rank applies the plan it chose (DDP: one tree everywhere)
            chosen = self._choose(pl_module).to_yaml() if trainer.is_global_zero else None
            self._given_plan = DropoutPlan.from_yaml(str(trainer.strategy.broadcast(chosen, src=0)))
            self._chosen = True
        super().setup(trainer, pl_module, stage)


class Tuner:
    """Runs trials for one parsed tuning config.

    Args:
        args: the config as CLI arguments (``["--config", "study.yaml", overrides...]``); re-parsed in each
            worker process, so workers need nothing but this list.
    """

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        # no per-trial config.yaml: it would repeat the study's storage URL, password included, on disk
        self.cli: ConfigCLI = load_config(self.args, instantiate=False, save_config=False)
        init = self.cli.fresh().config_init  # every class in the file is built once here: fail before trial 0
        self._fatal: DropoutConfigError | None = None
        self._site_columns: dict[str, list[str]] | None = None
        self.study_config: StudyConfig = init["study"]
        self.space: DropoutSpace = init["dropout"]
        if not self.space.groups:
            raise DropoutConfigError(
                "`dropout.groups` must list at least one group of sites to search, but the config has none."
            )
        check_run_dir(self.study_config.run_dir)
        check_no_injector(self.cli.trainer.callbacks)  # type: ignore[attr-defined]  # set by Lightning
        check_groups(self.space.groups, self.cli.model, getattr(self.cli.model, "example_input_array", None))

    def pin_threads(self) -> int:
        """Set this process's torch threads to ``study.threads`` (see
        :meth:`~lightning_dropout.tune.config.StudyConfig.torch_threads`); return the number."""
        threads = self.study_config.torch_threads()
        torch.set_num_threads(threads)
        return threads

    # -- storage ---------------------------------------------------------------------------------------------
    @property
    def storage_url(self) -> str:
        return self.study_config.storage_url()

    def storage(self) -> optuna.storages.BaseStorage:
        return open_storage(self.storage_url)

    def study(self) -> optuna.Study:
        """Open (or create) the study. The sampler draws each trial from its own stream, seeded from the trial
        number (:mod:`~lightning_dropout.tune.seeding`): a resumed study, a second worker or a joining machine
        never replays the proposals of earlier trials, and a fresh study is reproducible."""
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
        for key, value in (("metric", cfg.metric), ("winner_rule", cfg.winner), ("value", cfg.value)):
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        return study

    # -- one run -----------------------------------------------------------------------------------------------
    def train(
        self,
        plan: DropoutPlan | Callable[[torch.nn.Module], DropoutPlan],
        trial: optuna.Trial | None,
        seed: int,
        version: str,
        kind: str = "trial",
        number: int | None = None,
    ) -> tuple[TrialResult, DropoutPlan]:
        """Train one model with ``plan`` (or a function of the fresh model giving one) and return its metrics.

        The run is logged to TensorBoard as ``<run_dir>/<study>/trials/<version>`` and ends with one HParams
        record (the plan over the study's fixed site columns, the best value, the gap at the best epoch and the
        state), whatever the outcome. ``kind`` (``trial``/``rerun``) and ``number`` (the study trial it
        belongs to) label that record."""
        cfg = self.study_config
        pl.seed_everything(seed, workers=True, verbose=False)
        fixed = trial is not None and any(
            a in trial.user_attrs for a in (BASELINE_ATTR, WARM_START_ATTR, ENQUEUED_ATTR)
        )
        pruning = TrialPruning(trial, cfg.metric, cfg.direction, cfg.prune_after, prunable=not fixed)
        injector = _ChosenPlanInjector(
            plan if callable(plan) else (lambda _: plan), dropout_seed=cfg.dropout_seed
        )
        gap = GapMonitor(cfg.gap_samples, seed=cfg.seed) if cfg.gap_samples else None
        monitors: list[Callback] = [m for m in (gap,) if m is not None]
        if cfg.mc_samples:
            monitors.append(UncertaintyMonitor(cfg.mc_samples))
        logger = TrialLogger(Path(cfg.run_dir) / cfg.name, name="trials", version=version)
        cli = self.cli.fresh(
            [injector, *monitors, pruning],
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        columns = self._columns(cli.model)
        result: TrialResult | None = None
        try:
            with quiet_lightning():
                try:
                    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                except SystemExit as exit_:
                    # Lightning turns Ctrl-C into sys.exit(1); hand Optuna a KeyboardInterrupt instead, so it
                    # records the trial as failed (storage stays consistent) and stops the study
                    if cli.trainer.interrupted:
                        raise KeyboardInterrupt from exit_
                    raise
            metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
            best = pruning.best_index()
            metrics["best_value"] = math.nan if best is None else pruning.history[best]
            value = trial_value(pruning.history, cfg.value, pruning.maximize, cfg.value_window)
            metrics["value"] = value
            if best is not None:
                metrics["best_epoch"] = float(pruning.epochs[best])
                if gap is not None and best < len(gap.history):
                    at_best = gap.history[best]
                    metrics.update(
                        {
                            f"gap_at_best/{k[4:]}": v
                            for k, v in at_best.items()
                            if k.startswith("gap/") and k != "gap/seconds"
                        }
                    )
            result = TrialResult(None if best is None else value, metrics, pruning.pruned)
        finally:
            number = trial.number if trial is not None else number
            params: dict[str, Any] = {
                "trial": -1 if number is None else number,
                "kind": kind,
                "seed": seed,
                "baseline": str(trial.user_attrs.get(BASELINE_ATTR, "-")) if trial is not None else "-",
                "state": "failed" if result is None else result.state(),
            }
            chosen = injector.plan if injector.plan is not None else DropoutPlan()
            params.update(plan_hparams(chosen, columns))
            logger.finish(params, self._hparam_metrics(result, gap is not None))
        assert injector.plan is not None and result is not None  # set in setup() / after fit
        return result, injector.plan

    def _columns(self, model: torch.nn.Module) -> dict[str, list[str]]:
        """The study's HParams site columns, resolved on the first (fresh) model and kept: every trial builds
        the same model from the same config."""
        if self._site_columns is None:
            try:
                self._site_columns = plan_columns(
                    self.space.groups, model, getattr(model, "example_input_array", None)
                )
            except Exception as err:  # a model only the injector's configure_model builds: plan keys only
                log.debug("HParams site columns from the plan only: %s", err)
                self._site_columns = {}
        return self._site_columns

    def _hparam_metrics(self, result: TrialResult | None, with_gap: bool) -> dict[str, float]:
        """The HParams metrics, the same keys for every run of the study (NaN when unknown)."""
        metric = self.study_config.metric
        metrics = result.metrics if result is not None else {}
        out = {
            f"hp/best_{metric}": metrics.get("best_value", math.nan),
            "hp/best_epoch": metrics.get("best_epoch", math.nan),
            "hp/value": metrics.get("value", math.nan),
        }
        if with_gap:
            base = metric_base_name(metric)
            for name in sorted({base, "loss"}):
                out[f"hp/gap_at_best/{name}"] = metrics.get(f"gap_at_best/{name}", math.nan)
        return out

    @property
    def multiprocess(self) -> bool:
        """Whether a trial's trainer re-launches its script per rank (``strategy: ddp`` on several devices),
        read off the Trainer the config builds (whatever form the strategy and devices were given in)."""
        trainer = self.cli.trainer
        return isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.world_size > 1

    def run_trial(self, trial: optuna.Trial | None) -> tuple[TrialResult, DropoutPlan]:
        """Train the trial's plan in this process. Under DDP only rank 0 has the ``trial``; the others get
        ``None`` and receive the plan and the pruning decisions by broadcast."""
        baseline = trial.user_attrs.get(BASELINE_ATTR) if trial is not None else None

        def choose(model: torch.nn.Module) -> DropoutPlan:  # called on rank 0 only
            assert trial is not None
            if baseline is not None:
                return _baseline_plans(model)[baseline]
            if FIXED_PLAN_ATTR in trial.user_attrs:
                return DropoutPlan.from_yaml(trial.user_attrs[FIXED_PLAN_ATTR])
            example = getattr(model, "example_input_array", None)
            return suggest_plan(trial, self.space.groups, model, example)

        number = trial.number if trial is not None else 0
        return self.train(choose, trial, self.study_config.seed, version=f"trial_{number:04d}")

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

    def run_plan(self, plan: DropoutPlan, seed: int, version: str, number: int | None = None) -> TrialResult:
        """Train a fixed plan with ``seed`` (a re-run of trial ``number``), in its own process when the trainer
        is multi-process."""
        if self.multiprocess:
            job = {"plan": plan.to_yaml(), "seed": seed, "version": version, "number": number}
            return self._in_subprocess(version, job)[0]
        return self.train(plan, None, seed, version, kind="rerun", number=number)[0]

    def objective(self, trial: optuna.Trial) -> float:
        cfg = self.study_config
        try:
            if self.multiprocess:
                name = f"trial_{trial.number:04d}"
                result, plan = self._in_subprocess(name, {"trial_id": trial._trial_id})
            else:
                result, plan = self.run_trial(trial)
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
            raise
        trial.set_user_attr(PLAN_ATTR, plan.to_yaml())
        trial.set_user_attr(METRICS_ATTR, result.metrics)
        if result.pruned:
            raise optuna.TrialPruned("stopped by the pruner")
        diverged = result.diverged()
        if result.state() == "failed":
            reason = f"`{cfg.metric}` was NaN" if not diverged else f"{diverged} became NaN"
            trial.set_user_attr(FAIL_ATTR, f"{reason}: the training diverged")
            log.warning("trial %d failed: %s: the training diverged", trial.number, reason)
            raise FloatingPointError(reason)
        assert result.value is not None  # a complete trial has a finite value
        return result.value

    # -- the study ---------------------------------------------------------------------------------------------
    def enqueue_baselines(self, study: optuna.Study) -> None:
        if not self.study_config.baselines:
            return
        alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        present = {t.user_attrs.get(BASELINE_ATTR) for t in study.get_trials(deepcopy=False, states=alive)}
        for name in _baseline_plans(self.cli.fresh().model):
            if name not in present:
                study.enqueue_trial({}, user_attrs={BASELINE_ATTR: name}, skip_if_exists=False)

    def enqueue_fixed(self, study: optuna.Study) -> None:
        """Enqueue, once per study, what runs before the sampler: the baselines, the warm-start grid
        (``study.warm_start``) and the user's own trials (``study.enqueue``), in that order, as far as
        ``n_trials`` leaves room (a warning names what did not fit)."""
        self.enqueue_baselines(study)
        cfg = self.study_config
        alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        trials = study.get_trials(deepcopy=False, states=alive)
        present = {t.user_attrs.get(a) for t in trials for a in (WARM_START_ATTR, ENQUEUED_ATTR)} - {None}
        wanted: list[tuple[str, dict[str, Any], dict[str, Any]]] = []  # (label, params, user attrs)
        if cfg.warm_start and cfg.warm_start_rates:
            model = self.cli.fresh().model
            example = getattr(model, "example_input_array", None)
            seen: list[dict[str, Any]] = []
            for rate in cfg.warm_start_rates:
                params = uniform_params(self.space.groups, model, rate, example)
                if params not in seen:  # a rate clipped into the groups' ranges onto an earlier point
                    seen.append(params)
                    label = f"{UNIFORM_PREFIX}{rate:g}"
                    wanted.append((label, params, {WARM_START_ATTR: label}))
        for i, item in enumerate(cfg.enqueue):
            label = f"enqueued #{i + 1}"
            if "params" in item:
                wanted.append((label, item["params"], {ENQUEUED_ATTR: label}))
            else:
                plan = DropoutPlan.from_dict(item).to_yaml()
                wanted.append((label, {}, {ENQUEUED_ATTR: label, FIXED_PLAN_ATTR: plan}))
        room = cfg.n_trials - len(study.get_trials(deepcopy=False, states=alive))
        missing = [w for w in wanted if w[0] not in present]
        for _name, params, attrs in missing[: max(room, 0)]:
            study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
        if len(missing) > room:
            left = [w[0] for w in missing[max(room, 0) :]]
            log.warning("study.n_trials=%d leaves no room for the enqueued trials %s", cfg.n_trials, left)

    def run_worker(self, index: int = 0, study: optuna.Study | None = None) -> None:
        """Run trials until the study holds ``n_trials`` finished ones; ``index`` tells workers apart (worker 0
        may pass the study it already opened)."""
        cfg = self.study_config
        self.pin_threads()
        study = study if study is not None else self.study()

        def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            # trials other workers are running count too, so the workers do not all start the last one
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if finished_trials(study) + running >= cfg.n_trials:
                study.stop()

        if finished_trials(study) >= cfg.n_trials:
            return
        study.optimize(
            self.objective,
            n_trials=None,
            timeout=cfg.timeout,
            catch=(Exception,),
            callbacks=[stop],
        )
        if self._fatal is not None:
            raise self._fatal


def _worker_main(args: list[str], index: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as in `tune`: one line of ours per failed trial
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # as the CLI does
    try:
        Tuner(args).run_worker(index)
    except DropoutConfigError as err:
        sys.stderr.write(f"lightning-dropout: error: {redact(str(err))}\n")
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: its trial is recorded; the parent says so once
        sys.exit(130)


def run_workers(tuner: Tuner, study: optuna.Study | None = None) -> None:
    """Run the study's trials in ``study.workers`` workers: worker 0 in this process (with ``study`` if given),
    the others in spawned processes, so a study of N workers starts N-1 interpreters, not N."""
    n = tuner.study_config.workers
    if n == 1:
        tuner.run_worker(0, study)
        return
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_worker_main, args=(tuner.args, i), name=f"tune-worker-{i}")
        for i in range(1, n)
    ]
    for proc in procs:
        proc.start()
    try:
        try:
            # the spawned workers need seconds to import: this one asks first, so the startup trials differ
            tuner.run_worker(0, study)
        except DropoutConfigError:  # the others stop on it too (a fatal error ends the study): wait for them
            for proc in procs:
                proc.join()
            raise
        except Exception:  # not a trial's failure (those are recorded): do not leave the others running
            for proc in procs:
                proc.terminate()
                proc.join(timeout=60)
            raise
        for proc in procs:
            proc.join()
        if any(proc.exitcode == 2 for proc in procs):
            raise DropoutConfigError(
                "a worker stopped the study on a configuration error (its message is above)."
            )
    except KeyboardInterrupt:  # the workers got the SIGINT too: let them record their trials, then stop
        for proc in procs:
            proc.join(timeout=60)
        raise


# ----------------------------------------------------------------------------------------------------------
# The whole study: trials, re-runs over seeds, the winner
# ----------------------------------------------------------------------------------------------------------
def rerun_seeds(cfg: StudyConfig) -> list[int]:
    """The re-run seeds, the same for every candidate (paired comparison, common random numbers)."""
    return [cfg.seed + 1000 * (i + 1) for i in range(cfg.seeds)]


def _own_dropout(model: torch.nn.Module) -> float:
    """The sum of the rates of the dropout a model has as written (modules, attention and RNN dropout)."""
    return sum(
        existing_rate(m) or 0.0
        for m in model.modules()
        if is_dropout_module(m) or isinstance(m, (torch.nn.MultiheadAttention, torch.nn.RNNBase))
    )


def rerun(tuner: Tuner, study: optuna.Study, on_done: Callable[[str], None] | None = None) -> list[Candidate]:
    """Re-run the candidates over the ``study.seeds`` seeds of :func:`rerun_seeds`; store the values (and the
    seeds, and each plan's amount of dropout) on the study; best mean first."""
    cfg = tuner.study_config
    tuner.pin_threads()
    stored: dict[str, Any] = dict(study.user_attrs.get("reruns", {}))
    seeds = rerun_seeds(cfg)
    for trial in candidates(study, cfg.top_k):
        key = str(trial.number)
        info = dict(stored.get(key, {}))
        values = list(info.get("values", []))
        plan = stored_plan(trial)
        if "amount" not in info:
            as_written = trial.user_attrs.get(BASELINE_ATTR) == BASELINE_AS_WRITTEN
            info["amount"] = _own_dropout(tuner.cli.fresh().model) if as_written else plan_amount(plan)
        for i in range(len(values), cfg.seeds):
            result = tuner.run_plan(
                plan, seeds[i], version=f"rerun_{trial.number:04d}_seed{i}", number=trial.number
            )
            values.append(result.value if result.value is not None else math.nan)
            info.update(label=trial_label(trial), values=values, seeds=seeds[: len(values)])
            stored[key] = info
            study.set_user_attr("reruns", stored)
            if on_done is not None:
                on_done(f"{trial_label(trial)} seed {i + 1}/{cfg.seeds}")
    return rerun_candidates(study)
