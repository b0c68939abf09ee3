"""Every example script runs, with a tiny budget."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_torch_example():
    plan = _load("plain_torch").main()
    assert {s.key for s in plan} == {"lstm:input", "lstm:output", "lstm:weight", "lstm:attribute"}


def test_attach_callback_example(tmp_path):
    results = _load("attach_callback").main(
        [
            "--max-epochs",
            "2",
            "--limit-batches",
            "2",
            "--logdir",
            str(tmp_path),
            "--cache-dir",
            str(tmp_path / "d"),
        ]
    )
    assert {"test_acc", "test_loss", "mc_mean_entropy"} <= set(results)
    assert list((tmp_path / "attach_callback").rglob("events.out.tfevents.*"))
