"""Nothing generated is committed, and the ignore rules keep it out (checkpoints, logs, runs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_no_generated_artifact_is_tracked():
    tracked = _git("ls-files").stdout.splitlines()
    generated = [
        p
        for p in tracked
        if p.endswith((".ckpt", ".pt", ".pth"))
        or p.split("/")[0] in ("checkpoints", "lightning_logs", "runs")
    ]
    assert generated == []


@pytest.mark.parametrize(
    "path", ["checkpoints/epoch=0-step=2.ckpt", "model.ckpt", "lightning_logs/version_0/x", "runs/s/study.db"]
)
def test_generated_paths_are_ignored(path):
    assert _git("check-ignore", "-q", "--no-index", path).returncode == 0, f"{path} is not git-ignored"
