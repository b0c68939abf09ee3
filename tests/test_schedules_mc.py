"""Rate schedules (pure functions of progress) and MC-dropout prediction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dropout import DropoutConfigError, Rule, inject
from lightning_dropout.mc import mc_dropout, mc_predict, predictive_entropy
from lightning_dropout.schedules import (
    SCHEDULES,
    Constant,
    Cosine,
    Curriculum,
    EarlyDropout,
    LateDropout,
    Linear,
    make_schedule,
)


def test_constant_linear_cosine():
    assert Constant().factor(7, 10) == 1.0
    assert [Linear().factor(t, 10) for t in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert Linear(start=1.0, end=0.0, duration=4).factor(1, None) == 0.75
    assert Cosine().factor(0, 10) == pytest.approx(1.0)
    assert Cosine().factor(5, 10) == pytest.approx(0.5)
    assert Cosine().factor(10, 10) == pytest.approx(0.0)


def test_early_and_late_dropout_follow_liu_et_al():
    early = EarlyDropout(cutoff=50)
    assert early.factor(49, 300) == 1.0 and early.factor(50, 300) == 0.0
    linear = EarlyDropout(cutoff=10, mode="linear")
    assert linear.factor(0, None) == 1.0 and linear.factor(5, None) == 0.5 and linear.factor(10, None) == 0.0
    late = LateDropout(cutoff=3)
    assert [late.factor(t, None) for t in (0, 2, 3, 9)] == [0.0, 0.0, 1.0, 1.0]


def test_curriculum_rises_monotonically_towards_p():
    values = [Curriculum().factor(t, 100) for t in range(0, 101, 10)]
    assert values[0] == 0.0 and values == sorted(values)
    assert values[-1] == pytest.approx(1 - math.exp(-10))
    assert Curriculum(gamma=0.5).factor(2, None) == pytest.approx(1 - math.exp(-1))


def test_make_schedule_and_registry():
    assert make_schedule("early", cutoff=5) == EarlyDropout(cutoff=5)
    assert set(SCHEDULES) == {"constant", "linear", "cosine", "early", "late", "curriculum"}
    with pytest.raises(DropoutConfigError, match=r"`schedule` must be one of \['constant', 'cosine'"):
        make_schedule("earlyy")
    with pytest.raises(DropoutConfigError, match="schedule 'early'"):
        make_schedule("early", cutof=5)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EarlyDropout(cutoff=0), "`cutoff` must be a number > 0, but got cutoff=0"),
        (lambda: EarlyDropout(cutoff=3, mode="cosine"), r"`mode` must be one of \['constant', 'linear'\]"),
        (lambda: LateDropout(cutoff=-1), "`cutoff` must be a number > 0"),
        (lambda: Linear(start=2.0), "0 <= start <= 1"),
        (lambda: Cosine(duration=-1), "`duration` must be a number >= 0"),
        (lambda: Curriculum(gamma=0), "`gamma` must be a number > 0"),
        (lambda: Constant(unit="batch"), r"`unit` must be one of \['step', 'epoch'\], but got unit='batch'"),
        (lambda: Linear().factor(3, None), "needs `duration` > 0 or a run of known length"),
    ],
)
def test_bad_schedules(build, message):
    with pytest.raises(DropoutConfigError, match=message):
        build()


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 32)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def test_mc_predict_samples_only_dropout_and_restores_flags():
    torch.manual_seed(0)
    model = BNNet()
    inject(model, [Rule(name="bn", p=0.3)])
    model.train()
    stats = model.bn.running_mean.clone()
    x = torch.randn(16, 4)
    pred = mc_predict(model, x, n_samples=20, transform=lambda z: z.softmax(-1), keep_samples=True)
    assert pred.mean.shape == (16, 3) and pred.samples.shape == (20, 16, 3)
    assert (pred.std > 0).any()  # dropout sampled
    assert torch.equal(model.bn.running_mean, stats)  # BatchNorm stayed in eval mode: no statistics update
    assert model.training and model.bn.training  # every flag restored
    entropy = predictive_entropy(pred.mean)
    assert entropy.shape == (16,) and (entropy > 0).all() and (entropy <= math.log(3) + 1e-6).all()


def test_mc_dropout_context_switches_torch_and_attention_dropout():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True)
    model = nn.Sequential(layer, nn.BatchNorm1d(5))
    model.eval()
    with mc_dropout(model):
        assert layer.dropout.training and layer.self_attn.training and layer.training
        assert not model[1].training
        a, b = model(torch.randn(2, 5, 8).expand(2, 5, 8)), None
        b = model(torch.randn(2, 5, 8))
        assert a.shape == b.shape
    assert not layer.training and not layer.dropout.training


def test_mc_predict_rejects_too_few_samples():
    with pytest.raises(DropoutConfigError, match="`n_samples` must be an integer >= 2, but got n_samples=1"):
        mc_predict(BNNet(), torch.randn(2, 4), n_samples=1)
