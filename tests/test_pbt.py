"""Population-based training of the dropout rates (``study.method: pbt``): the exploit step copies weights and
optimizer state, a replayed schedule gives the member's rates epoch by epoch, a generation runs once however
many processes enqueue it, a stopped study resumes without redoing finished segments, and the config is checked
at load. Every population is tiny (MLP on MNIST-1D, 2 members, 2-epoch segments of 3 batches)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState
from studies import load, tune, write_config

from lightning_dropout.callback import DropoutInjector
from lightning_dropout.data import MNIST1DDataModule
from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.injection import site_handles
from lightning_dropout.plan import DropoutPlan, Site
from lightning_dropout.schedules import Linear
from lightning_dropout.tune import Tuner
from lightning_dropout.tune.config import StudyConfig
from lightning_dropout.tune.pbt import Population, Segment, _state, run_population
from lightning_dropout.tune.population import (
    PopulationConfig,
    RateRange,
    exploit_explore,
    lineage_schedule,
    population_size,
)
from lightning_dropout.tune.records import DUPLICATE, FAIL_ATTR, INTERRUPTED, PBT_ATTR, winner
from lightning_dropout.zoo import MLP

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = {
    "groups": [
        {
            "name": "hidden",
            "select": {"match": "Linear"},
            "variants": ["standard"],
            "p": [0.05, 0.5],
            "per_layer": True,
        }
    ]
}


def pbt_config(tmp_path: Path, max_epochs: int, interval: float, **study: Any) -> Path:
    """2 members, ``interval`` x ``max_epochs``-epoch segments; the worse half copies the better one."""
    population = {"size": 2, "interval": interval, "quantile": 0.5}
    return write_config(
        tmp_path,
        trainer={"max_epochs": max_epochs},
        dropout=GROUPS,
        study={"method": "pbt", "population": population, "value": "last", **study},
    )


def make_tuner(config: Path, tmp_path: Path, data_dir: Path, *extra: str) -> Tuner:
    run_dir, cache = f"--study.run_dir={tmp_path / 'runs'}", f"--data.init_args.cache_dir={data_dir}"
    return Tuner(["--config", str(config), run_dir, cache, *extra])


def segments_by_label(study) -> dict[str, list]:
    out: dict[str, list] = {}
    for trial in study.get_trials(deepcopy=False):
        if PBT_ATTR in trial.user_attrs:
            out.setdefault(trial.user_attrs[PBT_ATTR], []).append(trial)
    return out


def completed_once(study, labels: int) -> dict[str, Any]:
    """Each label's one complete trial (asserting there are ``labels`` labels, each complete exactly once)."""
    by_label = segments_by_label(study)
    assert len(by_label) == labels, sorted(by_label)
    done = {}
    for name, trials in by_label.items():
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 1, (name, [(t.number, t.state) for t in trials])
        done[name] = complete[0]
    return done


class StartState(Callback):
    """Saves, when training starts (after a checkpoint was restored), the weights and Adam's ``exp_avg`` of the
    run, as ``<out>/<logger version>_epoch<epoch>.pt``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "exp_avg": [
                optimizer.state[p]["exp_avg"].clone() if p in optimizer.state else None for p in params
            ],
        }
        torch.save(state, Path(self.out) / f"{trainer.logger.version}_epoch{trainer.current_epoch}.pt")


class RateLog(Callback):
    """The rate of every applied site at each epoch's first training batch (after the injector set it)."""

    def __init__(self) -> None:
        self.rates: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.rates.append({h.site.key: h.rate for h in site_handles(pl_module)})


def replay(plan: DropoutPlan | Path, max_epochs: int, data_dir: Path) -> list[dict[str, float]]:
    """Fit a fresh model with ``plan`` for ``max_epochs`` epochs; the sites' rates at each epoch."""
    log = RateLog()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=1,
        limit_val_batches=0,
        callbacks=[DropoutInjector(plan=plan), log],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        MLP(hidden=16), datamodule=MNIST1DDataModule(batch_size=50, num_samples=500, cache_dir=data_dir)
    )
    return log.rates


# ----------------------------------------------------------------------------------------------------------
# (a) exploit: the bottom member continues from the top member's weights AND optimizer state
# ----------------------------------------------------------------------------------------------------------
def test_exploit_copies_the_weights_and_optimizer_state_of_the_better_member(tmp_path, data_dir):
    out = tmp_path / "starts"
    out.mkdir()
    config = pbt_config(tmp_path, max_epochs=4, interval=0.5)  # 2 generations of 2 epochs
    tuner = make_tuner(config, tmp_path, data_dir)
    tuner.cli.config["trainer"]["callbacks"] = [
        {"class_path": "test_pbt.StartState", "init_args": {"out": str(out)}}
    ]
    run_population(tuner)
    study = load(tmp_path)
    done = completed_once(study, labels=4)
    first = [done["pbt g000 m00"].value, done["pbt g000 m01"].value]
    best, worst = (0, 1) if first[0] >= first[1] else (1, 0)  # ties rank the lower member first
    copier = Segment.of(done[f"pbt g001 m{worst:02d}"])
    keeper = Segment.of(done[f"pbt g001 m{best:02d}"])
    assert copier.copied_from == best and keeper.copied_from == best
    assert copier.start == keeper.start and copier.start.endswith(f"member_{best:02d}/gen_000.ckpt")
    assert copier.rates != keeper.rates  # explored: perturbed or resampled

    runs = tmp_path / "runs" / "s" / "pbt"
    source = torch.load(runs / f"member_{best:02d}" / "gen_000.ckpt", weights_only=False)
    own = torch.load(runs / f"member_{worst:02d}" / "gen_000.ckpt", weights_only=False)
    started = torch.load(out / f"member_{worst:02d}_epoch2.pt", weights_only=False)
    adam = [source["optimizer_states"][0]["state"][i]["exp_avg"] for i in range(len(started["exp_avg"]))]
    assert started["weights"].keys() == source["state_dict"].keys()
    for key, value in started["weights"].items():
        assert torch.equal(value, source["state_dict"][key]), key
    for mine, theirs in zip(started["exp_avg"], adam, strict=True):
        assert mine is not None and torch.equal(mine, theirs)
    # and not its own state: the members had trained apart (different rates) in generation 0
    assert any(not torch.equal(v, own["state_dict"][k]) for k, v in started["weights"].items())
    own_adam = [own["optimizer_states"][0]["state"][i]["exp_avg"] for i in range(len(started["exp_avg"]))]
    assert any(not torch.equal(a, b) for a, b in zip(started["exp_avg"], own_adam, strict=True))
    # the copy resumed the epoch counter too: the member's values are reported at epochs 2 and 3
    assert sorted(done[f"pbt g001 m{worst:02d}"].intermediate_values) == [2, 3]


# ----------------------------------------------------------------------------------------------------------
# (b) + (c) the whole `tune` command with two workers: each segment runs once; the schedules replay
# ----------------------------------------------------------------------------------------------------------
def test_two_workers_run_each_segment_once_and_the_schedules_replay_epoch_by_epoch(
    tmp_path, data_dir, capsys
):
    config = pbt_config(tmp_path, max_epochs=3, interval=1 / 3, workers=2)  # 3 generations of 1 epoch
    assert tune(config, tmp_path, data_dir) == 0
    printed = capsys.readouterr().out
    assert "population members" in printed and "winner: member" in printed
    study = load(tmp_path)
    done = completed_once(study, labels=6)
    # twins (enqueued by both workers at once) were never run
    others = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.COMPLETE]
    assert all(t.user_attrs.get(FAIL_ATTR) is not None for t in others), [(t.number, t.state) for t in others]

    # each member's lineage, from the storage: its last segment back through the members it copied
    lineages = []
    for member in range(2):
        chain, current = [], member
        for g in (2, 1, 0):
            segment = Segment.of(done[f"pbt g{g:03d} m{current:02d}"])
            chain.append(segment)
            current = segment.copied_from if segment.copied_from is not None else current
        lineages.append(chain[::-1])
    assert any(len({tuple(s.rates.values()) for s in chain}) > 1 for chain in lineages)  # rates did change

    result = Population(make_tuner(config, tmp_path, data_dir)).result(study)
    for member, chain in enumerate(lineages):
        rates = replay(result.plans[member], 3, data_dir)
        expected = []
        for epoch in range(3):
            segment = next(s for s in chain if s.start_epoch <= epoch < s.end_epoch)
            expected.append({f"{dim.split('/')[1]}:output": rate for dim, rate in segment.rates.items()})
        assert len(rates) == 3
        for epoch, (seen, wanted) in enumerate(zip(rates, expected, strict=True)):
            assert seen.keys() == wanted.keys()
            for key in seen:
                assert math.isclose(seen[key], wanted[key]), (member, epoch, key, seen[key], wanted[key])

    # the written best plan is the winner's schedule; `best` reads it from the storage; `fit --plan` replays it
    best_plan = DropoutPlan.load(tmp_path / "runs" / "s" / "best_plan.yaml")
    assert best_plan == result.plans[result.best] and winner(study)[0] == best_plan
    assert replay(tmp_path / "runs" / "s" / "best_plan.yaml", 3, data_dir) == replay(best_plan, 3, data_dir)
    # the trained model is the winner's last checkpoint
    assert result.checkpoint.is_file() and result.checkpoint.name == "gen_002.ckpt"


# ----------------------------------------------------------------------------------------------------------
# (c) two enqueuers of one generation at the same moment: the later twins are not run
# ----------------------------------------------------------------------------------------------------------
def test_a_generation_enqueued_twice_at_once_runs_once(tmp_path, data_dir):
    config = pbt_config(tmp_path, max_epochs=2, interval=0.5)  # 2 generations of 1 epoch
    tuner = make_tuner(config, tmp_path, data_dir)
    study = tuner.study()
    population = Population(tuner)
    first, _ = population.missing(study)
    second, _ = population.missing(study)  # the same snapshot: both see generation 0 missing
    assert [s.label for s in first] == [s.label for s in second] == ["pbt g000 m00", "pbt g000 m01"]
    population.enqueue(study, first)
    population.enqueue(study, second)
    run_population(tuner, study)
    completed_once(study, labels=4)
    twins = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    assert len(twins) == 2 and all(t.user_attrs[FAIL_ATTR] == DUPLICATE for t in twins)
    assert all(not t.intermediate_values for t in twins)  # never trained


# ----------------------------------------------------------------------------------------------------------
# (d) resume: a study stopped in generation 1 goes on without redoing generation 0
# ----------------------------------------------------------------------------------------------------------
def test_a_stopped_population_resumes_without_redoing_finished_segments(tmp_path, data_dir, monkeypatch):
    config = pbt_config(tmp_path, max_epochs=4, interval=0.5)
    trained: list[str] = []
    original = Population.train_segment

    def train_segment(self, trial, segment):
        if segment.generation == 1 and not any(name.startswith("pbt g001") for name in trained):
            trained.append(f"{segment.label} (interrupted)")
            raise KeyboardInterrupt
        trained.append(segment.label)
        return original(self, trial, segment)

    monkeypatch.setattr(Population, "train_segment", train_segment)
    with pytest.raises(KeyboardInterrupt):
        run_population(make_tuner(config, tmp_path, data_dir))
    study = load(tmp_path)
    assert [t.user_attrs.get(FAIL_ATTR) for t in study.trials if t.state == TrialState.FAIL] == [INTERRUPTED]
    before = len(trained)
    run_population(make_tuner(config, tmp_path, data_dir))  # the study resumes
    resumed = trained[before:]
    assert sorted(resumed) == ["pbt g001 m00", "pbt g001 m01"]  # nothing of generation 0 again
    done = completed_once(load(tmp_path), labels=4)
    assert Counter(name[:8] for name in done) == {"pbt g000": 2, "pbt g001": 2}
    # a study resumes only with the settings it started with (its generations must fit together)
    bigger = make_tuner(config, tmp_path, data_dir, '--study.population={"size": 3, "quantile": 0.5}')
    with pytest.raises(DropoutConfigError, match=r"\['interval', 'size'\] differ from those of study 's'"):
        run_population(bigger)


# ----------------------------------------------------------------------------------------------------------
# the decisions (pure) and the config
# ----------------------------------------------------------------------------------------------------------
def test_exploit_explore_copies_the_top_into_the_bottom_reproducibly():
    cfg = PopulationConfig(size=4, quantile=0.25, resample_probability=0.0, perturb=[0.8, 1.2])
    ranges = {"h": RateRange(0.0, 0.5)}
    values = [0.7, 0.9, 0.5, 0.8]
    rates = [{"h": 0.1}, {"h": 0.45}, {"h": 0.3}, {"h": 0.2}]
    choices = exploit_explore(values, rates, ranges, cfg, maximize=True, seed=0, generation=1)
    assert [c.source for c in choices] == [0, 1, 1, 3]  # member 2 (worst) copies member 1 (best)
    assert any(math.isclose(choices[2].rates["h"], r) for r in (0.36, 0.5))  # 0.45 x 0.8, or x 1.2 clipped
    assert [c.rates for i, c in enumerate(choices) if i != 2] == [rates[0], rates[1], rates[3]]
    again = exploit_explore(values, rates, ranges, cfg, maximize=True, seed=0, generation=1)
    assert again == choices
    # minimizing flips the ranking; a failed member (None) always copies
    flipped = exploit_explore([0.7, None, 0.5, 0.8], rates, ranges, cfg, maximize=False, seed=0, generation=1)
    assert flipped[1].source == 2 and flipped[3].source == 2 and flipped[0].source == 0
    assert lineage_schedule([(0, {"h": 0.2}), (2, {"h": 0.2}), (4, {"h": 0.3})]) == {
        "h": [(0, 0.2), (4, 0.3)]
    }
    assert [population_size(b) for b in (None, 1, 4.4, 10)] == [4, 2, 4, 10]


@pytest.mark.parametrize(
    ("population", "expected"),
    [
        ({"size": 1}, "`study.population.size` must be an integer >= 2, but got size=1"),
        ({"interval": 0}, "`study.population.interval` must satisfy 0 < interval <= 1, but got interval=0"),
        (
            {"quantile": 0.75},
            "`study.population.quantile` must satisfy 0 < quantile <= 0.5, but got quantile=0.75",
        ),
        ({"resample_probability": 2}, "0 <= resample_probability <= 1, but got resample_probability=2"),
        ({"perturb": [0.8, -1]}, "`study.population.perturb` must be a non-empty list of factors > 0"),
        ({"sise": 3}, "takes the keys ['size', 'interval'"),
    ],
)
def test_population_settings_are_checked_at_load(population, expected):
    with pytest.raises(DropoutConfigError) as info:
        StudyConfig(method="pbt", population=population)
    assert expected in str(info.value)
    if "sise" in population:
        assert "nearest: {'sise': ['size']}" in str(info.value)


def test_an_unknown_method_exits_2_naming_the_choices(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, study={"method": "pbtt"})
    assert tune(config, tmp_path, data_dir) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-dropout:")]
    assert len(lines) == 1 and "`study.method` must be one of ['trials', 'pbt'], but got 'pbtt'" in lines[0]
    assert StudyConfig().method == "trials"  # today's behaviour stays the default


def test_a_killed_segment_is_enqueued_again_and_given_up_after_three_kills():
    """A segment failed with no reason (a killed worker, failed by the heartbeat) is to run again; one that
    failed for a reason of its own (a NaN loss) is dead; twins and interruptions are not failures of it."""
    attrs = Segment(0, 1, 2, 4, {"hidden": 0.2}, "ckpt", 0).attrs()

    def trial(state: TrialState, reason: str | None = None, number: int = 0):
        user = {**attrs, **({FAIL_ATTR: reason} if reason else {})}
        made = optuna.trial.create_trial(
            state=state, user_attrs=user, value=0.5 if state == TrialState.COMPLETE else None
        )
        made.number = number
        return made

    killed = trial(TrialState.FAIL)
    assert _state([killed])[0] == "missing"
    assert _state([trial(TrialState.FAIL, INTERRUPTED)])[0] == "missing"
    assert _state([killed, trial(TrialState.WAITING)])[0] == "pending"  # the heartbeat's retry
    assert _state([killed] * 3)[0] == "dead"
    assert _state([trial(TrialState.FAIL, "FloatingPointError: NaN")])[0] == "dead"
    assert _state([trial(TrialState.FAIL, DUPLICATE)])[0] == "missing"
    done = trial(TrialState.COMPLETE, number=3)
    assert _state([killed, trial(TrialState.FAIL, DUPLICATE), done]) == ("done", done)


def test_a_site_takes_either_the_plans_rates_or_the_injectors_schedule(data_dir):
    plan = DropoutPlan([Site("linear1", "output", "standard", 0.1, rates=((0, 0.1), (1, 0.3)))])
    assert [r["linear1:output"] for r in replay(plan, 3, data_dir)] == [0.1, 0.3, 0.3]
    injector = DropoutInjector(plan=plan, schedule=Linear())
    with pytest.raises(DropoutConfigError, match=r"\['linear1:output'\] have both"):
        injector.inject(MLP(hidden=16))
