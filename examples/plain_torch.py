"""No Lightning: inject into any nn.Module, save the plan as YAML, re-apply it elsewhere, undo it.

python examples/plain_torch.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from lightning_dropout import DropoutPlan, Rule, describe, format_sites, inject, undo


class Tagger(nn.Module):
    """An embedding, a 2-layer LSTM and a classifier: a typical sequence model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True, dropout=0.1)
        self.out = nn.Linear(64, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(tokens))
        return self.out(h)


def main() -> DropoutPlan:
    model, tokens = Tagger(), torch.randint(0, 100, (4, 12))
    keys = list(model.state_dict())
    plan = inject(
        model,
        [
            Rule(
                match=nn.LSTM, variant="variational", p=0.3, where="both"
            ),  # one mask per sequence (AWD-LSTM)
            Rule(match=nn.LSTM, variant="weight", p=0.5),  # DropConnect on weight_hh_l0/l1
            Rule(replace=nn.LSTM, p=0.2),  # the LSTM's own inter-layer dropout
        ],
        example_input=tokens,
    )
    print(format_sites(describe(model, tokens)))
    assert list(model.state_dict()) == keys, "the user's parameter names never change"

    model.train()
    model(tokens).sum().backward()  # gradients reach lstm.weight_hh_l0 through the dropped copy
    assert model.lstm.weight_hh_l0.grad is not None

    with tempfile.TemporaryDirectory() as tmp:
        path = plan.save(Path(tmp) / "plan.yaml")
        print(path.read_text())
        fresh = Tagger()
        inject(fresh, plan=DropoutPlan.load(path))  # the same sites on another instance / process
        assert describe(fresh) == describe(model)

    undo(model)
    assert not any(name.endswith(("ld_output", "ld_input", "ld_weight")) for name, _ in model.named_modules())
    return plan


if __name__ == "__main__":
    main()
