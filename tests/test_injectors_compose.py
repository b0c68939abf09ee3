"""Injectors that compose: several named DropoutInjectors on one Trainer (each applying, scheduling and
checkpointing its own sites), `fit --plan` replacing the config's injector, and `tune` refusing a config that
already lists one."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TinyNet, loader, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from studies import BASE, write_config
from torch import nn

from lightning_dropout.callback import DropoutInjector
from lightning_dropout.checkpoints import checkpoint_plan, load_checkpoint
from lightning_dropout.cli import main
from lightning_dropout.errors import DropoutConfigError
from lightning_dropout.injection import Rule, applied_plan
from lightning_dropout.plan import DropoutPlan, Site
from lightning_dropout.schedules import Linear

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(p1: float = 0.2, p2: float = 0.4, **kwargs) -> tuple[DropoutInjector, DropoutInjector]:
    first = DropoutInjector(rules=[Rule(name="fc1", p=p1)], name="first", dropout_seed=1, **kwargs)
    second = DropoutInjector(
        rules=[Rule(name="fc2", variant="gaussian", p=p2)], name="second", dropout_seed=2
    )
    return first, second


def test_two_named_injectors_each_apply_their_own_sites():
    model = TinyNet()
    first, second = _pair()
    trainer(callbacks=[first, second]).fit(model, loader())
    assert [s.key for s in first.plan] == ["fc1:output"] and [s.key for s in second.plan] == ["fc2:output"]
    assert sorted(s.key for s in applied_plan(model)) == ["fc1:output", "fc2:output"]
    assert first.state_key != second.state_key and "first" in first.state_key


class _Rates(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((pl_module.fc1.ld_output.p, pl_module.fc2.ld_output.p))


def test_a_schedule_acts_on_its_own_injectors_sites_only():
    first, second = _pair(schedule=Linear(unit="step"))
    rates = _Rates()
    trainer(callbacks=[first, second, rates], max_epochs=2).fit(TinyNet(), loader())
    assert rates.seen[0][0] == pytest.approx(0.0) and rates.seen[-1][0] > 0.1  # fc1 warms up
    assert {round(p2, 6) for _, p2 in rates.seen} == {0.4}  # fc2 keeps its rate


def test_two_named_injectors_both_restore_from_a_checkpoint(tmp_path):
    first, second = _pair()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[first, second, ckpt], enable_checkpointing=True).fit(TinyNet(), loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert {first.state_key, second.state_key} <= set(saved["callbacks"])
    assert sorted(s.key for s in checkpoint_plan(saved)) == ["fc1:output", "fc2:output"]

    resumed_first, resumed_second = _pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[resumed_first, resumed_second], max_epochs=2).fit(
            TinyNet(), loader(), ckpt_path=str(tmp_path / "last.ckpt")
        )
    assert not [w for w in caught if "the checkpoint was trained with dropout plan" in str(w.message)]
    for before, after in ((first, resumed_first), (second, resumed_second)):
        assert after.plan == before.plan
        # each got its own mask generator back (seeded differently: the states differ)
        assert after._generator_state is not None
        assert torch.equal(after._generator_state, saved["callbacks"][before.state_key]["generator"])
    assert not torch.equal(resumed_first._generator_state, resumed_second._generator_state)
    model = load_checkpoint(TinyNet, tmp_path / "last.ckpt")  # both injectors' sites, loaded strictly
    assert sorted(s.key for s in applied_plan(model)) == ["fc1:output", "fc2:output"]


def test_two_injectors_with_one_state_key_are_refused_by_lightning():
    with pytest.raises(RuntimeError, match="state_key"):
        trainer(
            callbacks=[
                DropoutInjector(rules=[Rule(name="fc1", p=0.1)]),
                DropoutInjector(rules=[Rule(name="fc2", p=0.1)]),
            ]
        )


def test_two_injectors_claiming_one_site_are_refused():
    a = DropoutInjector(rules=[Rule(match=nn.Linear, p=0.1)], name="a")
    b = DropoutInjector(rules=[Rule(name="fc2", p=0.3)], name="b")
    with pytest.raises(DropoutConfigError, match=r"\['fc2:output'\] are claimed by both"):
        trainer(callbacks=[a, b]).fit(TinyNet(), loader())


def test_a_blank_name_is_refused():
    with pytest.raises(DropoutConfigError, match="`name` must be a non-empty string"):
        DropoutInjector(rules=[Rule(name="fc1", p=0.1)], name=" ")


# ----------------------------------------------------------------------------------------------------------
# The CLI: `fit --plan` replaces the config's injector; `tune` refuses one
# ----------------------------------------------------------------------------------------------------------
_INJECTOR = {
    "class_path": "lightning_dropout.callback.DropoutInjector",
    "init_args": {"rules": [{"match": "Linear", "variant": "standard", "p": 0.2}]},
}


def _fit_config(tmp_path: Path, data_dir: Path, callbacks: list) -> Path:
    config = {k: v for k, v in BASE.items() if k not in ("study", "dropout")}
    config["data"] = {
        "class_path": BASE["data"]["class_path"],
        "init_args": {**BASE["data"]["init_args"], "cache_dir": str(data_dir)},
    }
    config["trainer"] = {
        **BASE["trainer"],
        "max_epochs": 1,
        "limit_test_batches": 1,
        "logger": False,
        "enable_checkpointing": True,
        "default_root_dir": str(tmp_path / "root"),
        "callbacks": callbacks,
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_fit_plan_replaces_the_injector_of_the_config(tmp_path, data_dir, capsys):
    config = _fit_config(tmp_path, data_dir, [_INJECTOR])
    plan = DropoutPlan([Site("linear1", "output", "gaussian", 0.1)])
    plan.save(tmp_path / "plan.yaml")
    assert main(["fit", str(config), "--plan", str(tmp_path / "plan.yaml")]) == 0
    assert "val_acc" in capsys.readouterr().out
    (ckpt,) = (tmp_path / "root").rglob("*.ckpt")
    states = torch.load(ckpt, weights_only=False)["callbacks"]
    assert [k for k in states if k.startswith("DropoutInjector")] == ["DropoutInjector"]
    assert checkpoint_plan(torch.load(ckpt, weights_only=False)) == plan  # the plan's site, not the config's


def test_two_unnamed_injectors_in_a_config_fail_in_one_line(tmp_path, data_dir, capsys):
    config = _fit_config(tmp_path, data_dir, [_INJECTOR, _INJECTOR])
    assert main(["fit", str(config)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-dropout:")]
    assert len(err) == 1 and "distinct `name`" in err[0], err


def test_two_named_injectors_in_a_config_fit(tmp_path, data_dir):
    encoder = {
        "class_path": _INJECTOR["class_path"],
        "init_args": {"name": "enc", "rules": [{"name": "linear1", "p": 0.1}]},
    }
    head = {
        "class_path": _INJECTOR["class_path"],
        "init_args": {"name": "head", "rules": [{"name": "linear2", "p": 0.1}]},
    }
    assert main(["fit", str(_fit_config(tmp_path, data_dir, [encoder, head]))]) == 0
    (ckpt,) = (tmp_path / "root").rglob("*.ckpt")
    plan = checkpoint_plan(torch.load(ckpt, weights_only=False))
    assert sorted(s.target for s in plan) == ["linear1", "linear2"]


def test_tune_refuses_a_config_that_lists_an_injector(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, trainer={"callbacks": [_INJECTOR]})
    rc = main(
        [
            "tune",
            str(config),
            f"--study.run_dir={tmp_path / 'runs'}",
            f"--data.init_args.cache_dir={data_dir}",
        ]
    )
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-dropout:")]
    assert len(err) == 1 and "must not list a DropoutInjector when tuning" in err[0], err
    assert not (tmp_path / "runs").exists()  # no study was created
