"""Small torch models and helpers shared by the tests of the injection engine (tests/test_inject*.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


class CNN2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class RNNNet(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], num_layers: int, batch_first: bool) -> None:
        super().__init__()
        self.rnn = cell(4, 8, num_layers=num_layers, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.rnn(x)
        return self.head(y)


class TransformerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class WithDropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.drop2d = nn.Dropout2d(0.2)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.alpha = nn.AlphaDropout(0.1)
        self.fc2 = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.25)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop2d(torch.relu(self.conv(x))).flatten(1)
        x = self.alpha(torch.selu(self.fc1(x)))
        return self.out(self.drop(torch.relu(self.fc2(x))))


class Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(4, 8)
        self.seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.linear2 = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.seq(self.linear1(x)))
