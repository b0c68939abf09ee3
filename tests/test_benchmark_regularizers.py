"""Smoke test of benchmarks/regularizers.py --quick: every arm runs end to end (the L2 and combined studies
search `model.init_args.weight_decay` through a `search:` entry), a second run resumes without training, and
the report has every arm with its test accuracy and gap. The quick numbers mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end in a subprocess, ~30 s

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "regularizers.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--models",
        "mlp",
        "--work-dir",
        str(out),
        "--out",
        str(out / "r.md"),
    ]
    return subprocess.run(cmd, cwd=out, env=ENV, capture_output=True, text=True, timeout=400, check=False)


def test_quick_run_end_to_end_and_resume(tmp_path: Path) -> None:
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((tmp_path / "mlp.json").read_text())
    arms = state["result"]["arms"]
    assert list(arms) == ["none", "early_stop", "l2", "dropout", "both"]
    for info in arms.values():
        assert len(info["test"]) == len(info["gap"]) == 1 and 0.0 <= info["test"][0] <= 1.0
    assert state["studies"]["l2"]["plan"].strip() in (
        "sites: []",
        "sites: []\n".strip(),
    )  # dropout fixed at 0
    report = (tmp_path / "r.md").read_text()
    for text in (
        "no regularization",
        "early stopping only",
        "L2 weight decay, tuned",
        "dropout, tuned",
        "together",
    ):
        assert text in report

    second = _run(tmp_path)  # everything is saved: nothing trains again
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and " final " not in second.stderr
