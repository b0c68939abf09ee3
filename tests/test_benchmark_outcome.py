"""Smoke test of benchmarks/outcome.py --quick: it runs end to end, resumes, and writes a well-formed report.

The quick budget (the MLP, 2 epochs of 3 batches, 3 trials, 1 final seed) only checks the plumbing: the numbers
mean nothing, so the test checks their structure, the budgets and the protocol, not their values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: two subprocesses, ~30 s

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "outcome.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--out-dir",
        str(out),
        "--work-dir",
        str(out / "work"),
        *extra,
    ]
    return subprocess.run(cmd, cwd=out, env=ENV, capture_output=True, text=True, timeout=240, check=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("outcome")
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _in_unit(x: object) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_json_structure_and_budgets(quick_run: Path) -> None:
    data = json.loads((quick_run / "outcome.json").read_text())
    assert data["meta"]["quick"] is True and data["partial"] == []
    r = data["models"]["mlp"]
    assert r["model_class"] == "MLP" and r["paper"] == pytest.approx(0.68)
    for arm in ("none", "grid", "tuner", "optuna"):
        assert len(r["test"][arm]["values"]) == 1 and all(_in_unit(v) for v in r["test"][arm]["values"])
    budget = r["budget_epochs"]
    # (c)'s epochs: its trials plus its re-runs; (b) and (d) reach at least that; (a) selects nothing
    assert budget["tuner"] == r["tuner"]["trial_epochs"] + r["tuner"]["rerun_epochs"] > 0
    assert budget["grid"] >= budget["tuner"] and budget["optuna"] >= budget["tuner"] and budget["none"] == 0
    assert r["optuna"]["trials"] >= r["tuner"]["trials"] == 3
    # (c): the real tuner with its warm start and re-runs; no dropout is always a candidate
    labels = [c["label"] for c in r["tuner"]["candidates"]]
    assert "no dropout" in labels and "uniform p=0.1" in labels
    assert all(len(c["values"]) == 2 for c in r["tuner"]["candidates"])
    # (b): chosen by the mean value over its seeds, never by test accuracy
    means = r["grid"]["means"]
    assert float(max(means, key=means.get)) == r["grid"]["p"]
    assert set(r["targets"]) == {"c >= b", "c >= a", "c >= d", "c >= paper"}


def test_final_runs_train_on_all_4000_and_test_once(quick_run: Path) -> None:
    stages = json.loads((quick_run / "work" / "mlp_stages.json").read_text())
    finals = stages["final"]
    assert sorted(k.split("/")[0] for k in finals) == ["grid", "none", "optuna", "tuner"]
    assert all(run["seed"] == 1 and run["epochs"] == 2 for run in finals.values())
    # selection runs never saw the test set: they carry a validation curve and no test accuracy
    assert all("test" not in run and len(run["curve"]) == 2 for run in stages["grid"].values())


def test_a_second_invocation_resumes_without_training(quick_run: Path) -> None:
    before = (quick_run / "work" / "mlp_stages.json").read_text()
    proc = _run(quick_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "resuming from" in proc.stderr
        and "final" not in proc.stderr.split("resuming from", 1)[1].split("wrote")[0]
    )
    after = json.loads((quick_run / "work" / "mlp_stages.json").read_text())
    assert after["final"] == json.loads(before)["final"]


def test_markdown_report(quick_run: Path) -> None:
    text = (quick_run / "benchmarks.md").read_text()
    assert text.startswith("# Benchmarks: tuning outcome on MNIST-1D (second edition)")
    assert "smoke run" in text
    row = next(line for line in text.splitlines() if line.startswith("| MLP |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    for cell in cells[2:6]:
        assert 0.0 <= float(cell.split("±")[0]) <= 100.0
    assert cells[6] == "68.0" and "c >= paper" in cells[7]
