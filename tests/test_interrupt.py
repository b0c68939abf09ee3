"""Ctrl-C on a running two-worker ``tune`` prints one line, "interrupted; N trials kept; re-run to resume", and
no traceback (the workers get the SIGINT too and stop quietly)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "mnist1d_mlp.yaml")


def test_ctrl_c_prints_one_line_with_the_kept_trials(postgres_url, tmp_path, data_dir):
    storage = optuna.storages.RDBStorage(postgres_url)  # Optuna's tables, before two workers race on them
    name = f"ld-ctrlc-{uuid.uuid4().hex[:10]}"
    args = [
        sys.executable,
        "-m",
        "lightning_dropout.cli",
        "tune",
        CONFIG,
        f"--study.name={name}",
        f"--study.storage={postgres_url}",
        f"--study.run_dir={tmp_path / 'runs'}",
        "--study.workers=2",
        "--study.n_trials=50",
        f"--data.init_args.cache_dir={data_dir}",
        "--trainer.max_epochs=100000",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "500"}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                trials = optuna.load_study(study_name=name, storage=storage).get_trials()
            except KeyError:  # not created yet
                trials = []
            if sum(t.state == TrialState.RUNNING and bool(t.intermediate_values) for t in trials) >= 2:
                break
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    out_text, err_text = out.decode(errors="replace"), err.decode(errors="replace")
    assert proc.returncode == 130, err_text[-3000:]
    assert "Traceback" not in out_text + err_text, err_text[-3000:]
    ours = [line for line in err_text.splitlines() if line.startswith("lightning-dropout:")]
    assert len(ours) == 1 and re.fullmatch(
        r"lightning-dropout: interrupted; \d+ trials? kept; re-run to resume", ours[0]
    ), ours
    # everything else on stderr is the study's header and progress bar
    others = [line for line in err_text.splitlines() if line.strip() and line not in ours]
    assert all(line.startswith(("study ", "trials")) for line in others), "\n".join(others)
    # every worker recorded its interrupted trial before it stopped (none was killed with its trial running)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
def test_a_worker_interrupted_while_it_imports_leaves_quietly(tmp_path):
    """A spawned worker's first code installs the Ctrl-C handling before it imports torch, Lightning and
    Optuna: a SIGINT landing in those imports ends it with 130 and no traceback (it printed one before)."""
    code = (
        "from lightning_dropout._worker_start import start_worker\n"
        "start_worker('lightning_dropout.tune.workers:worker_main', "
        f"['--config', {str(tmp_path / 'missing.yaml')!r}], 1)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():  # torch's libraries are loading: the imports are under way
                break
        except OSError:
            pass
        time.sleep(0.005)
    assert proc.poll() is None, "the worker ended before its imports"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, (proc.returncode, err)
