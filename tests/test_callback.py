"""DropoutInjector: when it injects, schedules, concrete regularizer, checkpoints, DDP, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TinyNet, loader, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_dropout import DropoutConfigError, DropoutPlan, Rule, Site, applied_plan
from lightning_dropout.callback import DropoutInjector, load_checkpoint
from lightning_dropout.checkpoints import checkpoint_plan
from lightning_dropout.schedules import Constant, EarlyDropout, Linear
from lightning_dropout.variants import ConcreteDropout, Dropout

HERE = Path(__file__).parent


def test_injects_in_setup_before_optimizers_and_keeps_user_keys():
    model = TinyNet()
    keys = set(model.state_dict())
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, variant="concrete", p=0.2)])
    trainer(callbacks=[injector]).fit(model, loader())
    # the output layer `head` is excluded; fc1 and fc2 got a learned-rate site before configure_optimizers ran
    assert [s.key for s in injector.plan] == ["fc1:output", "fc2:output"]
    assert {"fc1.ld_output.p_logit", "fc2.ld_output.p_logit"} <= set(model.seen_by_optimizer)
    assert set(model.state_dict()) - keys == {"fc1.ld_output.p_logit", "fc2.ld_output.p_logit"}
    assert keys <= set(model.state_dict())


def test_a_plan_provider_chooses_the_plan_from_the_set_up_module_once():
    """`plan=` a callable: asked once, with the module after `configure_model`; its plan is applied and kept
    for later stages (the tuner samples a trial's plan this way; under DDP rank 0 asks and broadcasts)."""
    seen: list[list[str]] = []

    def choose(module: L.LightningModule) -> DropoutPlan:
        seen.append([name for name, _ in module.named_children()])
        return DropoutPlan([Site(target="late", where="output", variant="standard", p=0.3)])

    model = BuiltLater()
    injector = DropoutInjector(plan=choose)
    assert "plan=provided" in repr(injector)
    fit = trainer(callbacks=[injector])
    fit.fit(model, loader())
    fit.validate(model, loader())
    assert seen == [["fc1", "fc2", "head", "late"]]  # once, and `late` was already built
    assert [s.key for s in injector.plan] == ["late:output"]
    assert isinstance(model.late.ld_output, Dropout)

    # outside a Trainer too
    other = BuiltLater()
    other.configure_model()
    assert [s.key for s in DropoutInjector(plan=choose).inject(other)] == ["late:output"]


class BuiltLater(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.late = None

    def configure_model(self) -> None:
        if self.late is None:  # idempotent, as Lightning requires
            self.late = nn.Linear(16, 16)

    def forward(self, x):
        return self.head(torch.relu(self.late(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def test_layers_built_in_configure_model_are_injected():
    model = BuiltLater()
    injector = DropoutInjector(rules=[Rule(name="late", p=0.3)])
    trainer(callbacks=[injector]).fit(model, loader())
    assert [s.key for s in injector.plan] == ["late:output"]
    assert isinstance(model.late.ld_output, Dropout)


def test_concrete_regularizer_is_added_to_the_loss_and_rates_learn():
    torch.manual_seed(0)
    model = TinyNet()
    injector = DropoutInjector(
        rules=[Rule(match=nn.Linear, variant="concrete", p=0.3, params={"dropout_regularizer": 1.0})]
    )
    trainer(callbacks=[injector], max_epochs=3).fit(model, loader())
    site = model.fc1.ld_output
    assert isinstance(site, ConcreteDropout)
    # a large dropout regularizer maximises the entropy term's pull, so p moves away from its start
    assert abs(site.p - 0.3) > 1e-3
    # the wrapper is removed at teardown: the class's own training_step is back
    assert "training_step" not in model.__dict__


def test_concrete_regularizer_changes_the_returned_loss():
    model = TinyNet()
    injector = DropoutInjector(
        rules=[Rule(match=nn.Linear, variant="concrete", p=0.3, params={"dropout_regularizer": 10.0})]
    )
    t = trainer(callbacks=[injector])
    injector.setup(t, model, "fit")
    batch = next(iter(loader()))
    torch.manual_seed(1)
    with_reg = model.training_step(batch, 0)
    torch.manual_seed(1)
    plain = type(model).training_step(model, batch, 0)
    assert not torch.allclose(with_reg, plain)
    from lightning_dropout.injection import regularization

    assert torch.allclose(with_reg - plain, regularization(model), atol=1e-5)


def test_concrete_rate_must_reach_an_optimizer():
    class HeadOnlyOptimizer(TinyNet):
        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    injector = DropoutInjector(rules=[Rule(match=nn.Linear, variant="concrete", p=0.2)])
    with pytest.raises(DropoutConfigError, match=r"p_logit.*must be a trainable parameter of an optimizer"):
        trainer(callbacks=[injector]).fit(HeadOnlyOptimizer(), loader())


def test_concrete_with_manual_optimization_is_refused():
    class Manual(TinyNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    injector = DropoutInjector(rules=[Rule(match=nn.Linear, variant="concrete", p=0.2)])
    with pytest.raises(DropoutConfigError, match="automatic_optimization=True"):
        trainer(callbacks=[injector]).fit(Manual(), loader())


class RateRecorder(Callback):
    def __init__(self):
        self.rates: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append((trainer.current_epoch, trainer.global_step, pl_module.fc1.ld_output.p))


def test_epoch_schedule_early_dropout():
    recorder = RateRecorder()
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.4)], schedule=EarlyDropout(cutoff=2))
    trainer(callbacks=[injector, recorder], max_epochs=4).fit(TinyNet(), loader())
    by_epoch = {e: p for e, _, p in recorder.rates}
    assert by_epoch == {0: 0.4, 1: 0.4, 2: 0.0, 3: 0.0}


def test_step_schedule_linear_ramps_and_logs_rates():
    recorder = RateRecorder()
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.5)], schedule=Linear(unit="step"))
    t = trainer(callbacks=[injector, recorder], max_epochs=2, log_every_n_steps=1)
    t.fit(TinyNet(), loader())
    total = t.estimated_stepping_batches
    for _, step, p in recorder.rates:
        assert p == pytest.approx(0.5 * step / total)
    assert "dropout/rate/fc1.output" in t.callback_metrics


def test_schedule_mapping_by_site_glob_and_unmatched_glob():
    recorder = RateRecorder()
    injector = DropoutInjector(
        rules=[Rule(match=nn.Linear, p=0.4)], schedule={"fc2:*": EarlyDropout(cutoff=1)}
    )
    model = TinyNet()
    trainer(callbacks=[injector, recorder], max_epochs=2).fit(model, loader())
    assert {p for _, _, p in recorder.rates} == {0.4}  # fc1 is not scheduled
    assert model.fc2.ld_output.p == 0.0
    bad = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.4)], schedule={"encoder.*": Constant()})
    with pytest.raises(DropoutConfigError, match=r"`schedule` globs must match a site, but \['encoder.\*'\]"):
        trainer(callbacks=[bad]).fit(TinyNet(), loader())


def _scalar_steps(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = logdir.rglob("events.out.tfevents*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_constant_rates_are_logged_once_per_epoch_and_scheduled_ones_per_step(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    # fc1 constant, fc2 on a step schedule: 4 steps per epoch, 2 epochs, a scalar every step
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.4)], schedule={"fc2:*": Linear(unit="step")})
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(callbacks=[injector], logger=logger, log_every_n_steps=1, max_epochs=2).fit(TinyNet(), loader())
    scalars = _scalar_steps(tmp_path)
    assert scalars["dropout/rate/fc1.output"] == [(0, pytest.approx(0.4)), (4, pytest.approx(0.4))]
    assert [step for step, _ in scalars["dropout/rate/fc2.output"]] == list(range(8))
    assert [step for step, _ in scalars["dropout/mean_rate"]] == list(range(8))  # it moves with fc2
    # nothing varies within an epoch: every rate and the mean once per epoch
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.3)], schedule=EarlyDropout(cutoff=1))
    logger = TensorBoardLogger(tmp_path / "constant", name="tb", version=0)
    trainer(callbacks=[injector], logger=logger, log_every_n_steps=1, max_epochs=2).fit(TinyNet(), loader())
    scalars = _scalar_steps(tmp_path / "constant")
    for tag in ("dropout/rate/fc1.output", "dropout/rate/fc2.output", "dropout/mean_rate"):
        assert scalars[tag] == [(0, pytest.approx(0.3)), (4, 0.0)], (
            tag
        )  # the epoch schedule's value each epoch


def test_track_drop_fraction_is_logged():
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.5)], track_drop_fraction=True)
    t = trainer(callbacks=[injector], log_every_n_steps=1, max_epochs=1)
    t.fit(TinyNet(), loader(n=256, batch_size=128))
    fraction = float(t.callback_metrics["dropout/fraction/fc1.output"])
    assert 0.35 < fraction < 0.65


def test_plan_from_yaml_file(tmp_path):
    path = DropoutPlan([Site("fc2", "output", "gaussian", 0.1)]).save(tmp_path / "plan.yaml")
    model = TinyNet()
    injector = DropoutInjector(plan=str(path))
    trainer(callbacks=[injector]).fit(model, loader())
    assert applied_plan(model) == DropoutPlan.load(path)


def test_resume_restores_structure_rates_and_schedule_position(tmp_path):
    rules = [Rule(match=nn.Linear, variant="concrete", p=0.2), Rule(name="fc2", p=0.4)]
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = TinyNet()
    t1 = trainer(
        callbacks=[DropoutInjector(rules=rules, schedule={"fc2:*": Linear(unit="step")}), ckpt],
        max_epochs=2,
        enable_checkpointing=True,
    )
    t1.fit(first, loader())
    learned = first.fc1.ld_output.p
    recorder = RateRecorder()
    resumed = TinyNet()
    injector = DropoutInjector(rules=rules, schedule={"fc2:*": Linear(unit="step")})
    t2 = trainer(callbacks=[injector, recorder], max_epochs=3)
    t2.fit(resumed, loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert injector.plan == applied_plan(first)
    # the learned rate came back from the checkpoint (it is not the initial 0.2) ...
    assert resumed.fc1.ld_output.p != pytest.approx(0.2, abs=1e-6)
    assert recorder.rates[0][1] == t1.global_step  # ... and the schedule continued from the saved step
    assert resumed.fc2.ld_output.p == pytest.approx(
        0.4 * t2.global_step / t2.estimated_stepping_batches, rel=0.2
    )
    assert learned != pytest.approx(0.2, abs=1e-6)


def test_resume_with_another_plan_warns(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(
        callbacks=[DropoutInjector(rules=[Rule(name="fc1", p=0.2)]), ckpt], enable_checkpointing=True
    ).fit(TinyNet(), loader())
    with pytest.warns(UserWarning, match="the checkpoint was trained with dropout plan"):
        trainer(callbacks=[DropoutInjector(rules=[Rule(name="fc1", p=0.3)])], max_epochs=2).fit(
            TinyNet(), loader(), ckpt_path=str(tmp_path / "last.ckpt")
        )


def test_load_checkpoint_one_liner(tmp_path):
    model = TinyNet()
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, variant="concrete", p=0.25)])
    t = trainer(callbacks=[injector])
    t.fit(model, loader())
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    loaded = load_checkpoint(TinyNet, path)
    assert applied_plan(loaded) == injector.plan
    assert not loaded.training
    assert loaded.fc1.ld_output.p == pytest.approx(model.fc1.ld_output.p)
    x = torch.randn(4, 8)
    model.eval()
    assert torch.allclose(loaded(x), model(x))
    assert checkpoint_plan(torch.load(path, weights_only=False)) == injector.plan
    # the user's own weights load into the plain model: only the learned rates are extra keys
    plain = TinyNet()
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["fc1.ld_output.p_logit", "fc2.ld_output.p_logit"]


def test_checkpoint_without_injector_state_is_refused(tmp_path):
    t = trainer()
    t.fit(TinyNet(), loader())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(DropoutConfigError, match="must hold a DropoutInjector state"):
        load_checkpoint(TinyNet, tmp_path / "plain.ckpt")


def test_setup_twice_is_idempotent():
    model = TinyNet()
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.2)])
    t = trainer(callbacks=[injector])
    t.fit(model, loader())
    tree = repr(model)
    t.validate(model, loader())  # setup runs again for the validate stage
    assert repr(model) == tree


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of `rules` and `plan`"),
        (
            {"rules": [Rule(match=nn.Linear, p=0.1)], "plan": DropoutPlan()},
            "exactly one of `rules` and `plan`",
        ),
        ({"rules": []}, "at least one Rule"),
        ({"rules": "Linear"}, "must be a list of Rule"),
        ({"rules": [{"match": "Linear", "p": 0.1, "colour": "red"}]}, r"rules\[0\]:.*colour"),
        ({"rules": [{"match": "Linear", "p": 1.5}]}, r"0 <= p < 1, but got p=1.5"),
        ({"rules": [Rule(match=nn.Linear, p=0.1)], "schedule": "early"}, "must be a Schedule or a mapping"),
        ({"plan": 3}, "`plan` must be a DropoutPlan, a path"),
        ({"plan": "/no/such/plan.yaml"}, "a plan file must exist"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(DropoutConfigError, match=message):
        DropoutInjector(**kwargs)


def test_rule_matching_nothing_fails_at_setup_with_closest_names():
    injector = DropoutInjector(rules=[Rule(name="fc_1", p=0.2)])
    with pytest.raises(DropoutConfigError, match=r"matches none; closest module names: \['fc1'"):
        trainer(callbacks=[injector]).fit(TinyNet(), loader())


def test_variant_that_cannot_apply_names_site_and_shape():
    injector = DropoutInjector(rules=[Rule(match=nn.Linear, variant="spatial", p=0.2)])
    with pytest.raises(
        DropoutConfigError, match=r"site 'fc1:output': variant 'spatial' needs a feature map.*\(2, 16\)"
    ):
        trainer(callbacks=[injector]).fit(TinyNet(), loader())


@pytest.mark.slow
def test_ddp_two_processes_share_one_plan(tmp_path):
    env_script = HERE / "scripts" / "ddp_inject.py"
    result = subprocess.run(
        [sys.executable, str(env_script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=HERE.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["tree"] == ranks[1]["tree"]
    assert ranks[0]["finished"] and ranks[1]["finished"]
    # learned rates were registered before DDP wrapped the model: the optimizer has them, ranks agree
    assert "body.0.ld_output.p_logit" in ranks[0]["optimizer_params"]
    assert ranks[0]["p_logits"] == ranks[1]["p_logits"]
    plan = DropoutPlan.from_yaml(ranks[0]["plan"])
    assert {s.key for s in plan} == {"body.0:output", "body.2:output", "rnn:output", "rnn:weight"}
