"""Smoke test of benchmarks/outcome.py --quick: it runs end to end and writes a well-formed report.

The quick budget (1 model, 2 epochs, 2 trials, 1 seed, 4 batches per epoch) only checks the plumbing: the
numbers mean nothing, so the test checks their structure and range, not their values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: one subprocess, ~20 s on an idle core

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "outcome.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("outcome")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out-dir", str(out), "--work-dir", str(out / "work")],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _in_unit(x: object) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_json_structure(quick_run: Path) -> None:
    data = json.loads((quick_run / "outcome.json").read_text())
    meta = data["meta"]
    assert meta["quick"] is True
    assert meta["partial"] is None
    assert meta["wall_seconds"] > 0
    assert meta["machine"]["nproc"] >= 1
    assert list(data["models"]) == ["mlp"]
    r = data["models"]["mlp"]
    assert r["model_class"] == "MLP"
    assert r["paper"] == pytest.approx(0.68)
    for arm in ("none", "grid", "tuner"):
        assert len(r[arm]["runs"]) == len(meta["final_seeds"]) == 1
        for key in ("test", "test_last", "val"):
            stats = r[arm][key]
            assert set(stats) == {"mean", "std", "min", "max"}
            assert all(_in_unit(v) for v in stats.values())
        for run in r[arm]["runs"]:
            assert _in_unit(run["test"]) and _in_unit(run["val"]) and _in_unit(run["test_last"])
            assert run["epochs"] == 2
    grid = r["grid"]
    assert [s["p"] for s in grid["selection"]] == meta["grid"]
    assert grid["best_p"] in meta["grid"]
    assert all(_in_unit(s["val"]) for s in grid["selection"])
    # the grid point chosen is the best by validation accuracy, never by test accuracy
    assert grid["best_val"] == max(s["val"] for s in grid["selection"])
    tuner = r["tuner"]
    assert tuner["trials"] == meta["trials"] == 2
    assert tuner["complete"] + tuner["pruned"] + tuner["fail"] == tuner["trials"]
    assert _in_unit(tuner["best_val"])
    assert set(r["targets"]) == {"tuner_ge_grid", "tuner_ge_none", "tuner_gt_paper"}
    assert all(isinstance(v, bool) for v in r["targets"].values())


def test_markdown_table(quick_run: Path) -> None:
    text = (quick_run / "benchmarks.md").read_text()
    assert text.startswith("# Benchmarks: tuning outcome on MNIST-1D")
    assert "smoke run" in text
    assert "| model | (a) no dropout | (b) best grid point | (c) tuner, 2 trials | paper |" in text
    row = next(line for line in text.splitlines() if line.startswith("| MLP |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    for cell in cells[1:4]:
        mean = float(cell.split("±")[0])
        assert 0.0 <= mean <= 100.0
    assert cells[4] == "68.0"
    assert "Total wall time" in text
