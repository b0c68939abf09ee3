"""The rate's path from a search space to the kernel: each site's module is built once per trial, and its rate
and parameters are checked at most twice (once by the rule its group drew, once by the module that is kept)."""

from __future__ import annotations

from typing import Any

import lightning as L
import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dropout.callback import DropoutInjector
from lightning_dropout.tune.space import SearchGroup, suggest_plan
from lightning_dropout.variants import DropoutVariant


class Counts:
    def __init__(self) -> None:
        self.builds = 0
        self.checks = 0  # calls of check_params: a Rule's or a Site's check without building
        self.rates = 0  # every check of a rate, the kept module's constructor included


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    seen = Counts()
    init, check_params, checked_rate = (
        DropoutVariant.__init__,
        DropoutVariant.check_params.__func__,  # type: ignore[attr-defined]
        DropoutVariant.checked_rate.__func__,  # type: ignore[attr-defined]
    )

    def counted_init(self: DropoutVariant, *args: Any, **kwargs: Any) -> None:
        seen.builds += 1
        init(self, *args, **kwargs)

    def counted_check(cls: type[DropoutVariant], *args: Any) -> Any:
        seen.checks += 1
        return check_params(cls, *args)

    def counted_rate(cls: type[DropoutVariant], p: object) -> float:
        seen.rates += 1
        return checked_rate(cls, p)  # type: ignore[no-any-return]

    monkeypatch.setattr(DropoutVariant, "__init__", counted_init)
    monkeypatch.setattr(DropoutVariant, "check_params", classmethod(counted_check))
    monkeypatch.setattr(DropoutVariant, "checked_rate", classmethod(counted_rate))
    return seen


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()
        )
        self.head = nn.Linear(16, 2)
        self.example_input_array = torch.zeros(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _groups(per_layer: bool, depth_scaling: list[str]) -> list[SearchGroup]:
    return [
        SearchGroup(
            "hidden",
            {"match": "Linear"},
            ["standard", "gaussian"],
            p=[0.05, 0.4],
            per_layer=per_layer,
            depth_scaling=depth_scaling,
        )
    ]


@pytest.mark.parametrize(
    ("per_layer", "depth_scaling"), [(True, ["none"]), (False, ["none"]), (False, ["linear"])]
)
def test_a_trial_builds_each_site_once_and_checks_its_rate_at_most_twice(
    counts: Counts, tmp_path: Any, per_layer: bool, depth_scaling: list[str]
) -> None:
    groups = _groups(per_layer, depth_scaling)  # the space's own checks happen once, before any trial
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    model = Net()
    trial = study.ask()
    counts.__init__()  # type: ignore[misc]  # count from the trial on
    injector = DropoutInjector(plan=lambda m: suggest_plan(trial, groups, m, m.example_input_array))
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[injector],
        default_root_dir=tmp_path,
    )
    data = DataLoader(TensorDataset(torch.randn(4, 8), torch.zeros(4)), batch_size=4)
    trainer.fit(model, data)
    assert injector.plan is not None
    sites = len(injector.plan)
    assert sites == 3  # the three hidden Linears; the head is the output layer
    kept = [m for m in model.modules() if isinstance(m, DropoutVariant)]
    assert len(kept) == sites
    assert counts.builds == sites  # one module per site: no build to check parameters or shapes
    # the Rule checks once for its sites (per layer: a rule per site, after one rule to find the layers); the
    # sites it makes are taken as checked, but for the first site of a linear depth scaling, whose rate of 0
    # not every variant takes
    rules = sites + 1 if per_layer else 1
    zero_rate = depth_scaling == ["linear"]
    assert counts.checks == rules + zero_rate
    assert counts.rates == counts.checks + counts.builds
    assert counts.rates <= 2 * sites + 1


def test_a_site_of_its_own_is_checked_once_without_a_build(counts: Counts) -> None:
    from lightning_dropout import Site

    Site("fc", "output", "dropblock", 0.2, {"block_size": 3})
    assert (counts.checks, counts.rates, counts.builds) == (1, 1, 0)


def test_a_rule_that_completes_a_sites_parameters_has_the_site_checked(counts: Counts) -> None:
    from lightning_dropout import Rule, resolve

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    plan = resolve(net, [Rule(match=nn.Linear, variant="weight", p=0.3)])
    # the site's `weights` are read off its Linear, so the Site checks them; nothing is built to resolve
    assert [dict(s.params) for s in plan] == [{"weights": ["weight"]}]
    assert (counts.checks, counts.builds) == (2, 0)


@pytest.mark.parametrize(
    ("variant", "p", "params"),
    [
        ("standard", 0.2, {"scaling": "classic"}),
        ("dropblock", 0.2, {"block_size": 0}),
        ("concrete", 0.0, {}),
        ("concrete", 0.2, {"temperature": "hot"}),
        ("concrete", 0.2, {"weight_regularizer": -1.0}),
        ("weight", 0.2, {"weights": "weight"}),
        ("gaussian", 1.0, {}),
        ("gaussian", 0.2, {"block_size": 3}),
    ],
)
def test_check_params_refuses_what_the_constructor_refuses_with_the_same_line(
    variant: str, p: float, params: dict[str, Any]
) -> None:
    from lightning_dropout import DropoutConfigError
    from lightning_dropout.variants import build_variant, get_variant

    with pytest.raises(DropoutConfigError) as checked:
        get_variant(variant).check_params(p, params)
    with pytest.raises(DropoutConfigError) as built:
        build_variant(variant, p, **params)
    assert str(checked.value) == str(built.value)


def test_params_that_are_not_a_mapping_are_refused_by_the_shared_check() -> None:
    from lightning_dropout import DropoutConfigError, Rule, Site
    from lightning_dropout.variants import get_variant

    for make in (
        lambda: get_variant("dropblock").check_params(0.1, [("block_size", 3)]),
        lambda: Site("fc", "output", "dropblock", 0.1, [("block_size", 3)]),  # type: ignore[arg-type]
        lambda: Rule(match="Linear", variant="dropblock", p=0.1, params=[("block_size", 3)]),
        lambda: Rule(match="Dropout", replace=True, variant="dropblock", params="block_size=3"),  # no p
    ):
        with pytest.raises(DropoutConfigError, match="`params` must be a mapping"):
            make()
