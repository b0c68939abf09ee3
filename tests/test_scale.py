"""Workers that divide the GPUs (``study.devices``, ``--workers auto``), checked on the CPU: each worker process
and each rank of its DDP trials records the ``CUDA_VISIBLE_DEVICES`` it sees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from studies import tune, write_config

from lightning_dropout.cli import _study_shortcuts, main
from lightning_dropout.tune import Tuner

# a callback in its own module under tmp_path (the current folder of the test): the spawned worker imports it
# through sys.path, the DDP trial processes and their ranks through PYTHONPATH
PROBE = '''
import json, os, time
import lightning.pytorch as pl


class DeviceProbe(pl.Callback):
    """Appends what this rank sees; the first trial of process `hold` waits (at most `timeout` s) until a trial
    of another worker has started, so that both workers run one."""

    def __init__(self, path: str, hold: int = 0, timeout: float = 90.0) -> None:
        self.path, self.hold, self.timeout = path, hold, timeout

    def on_fit_start(self, trainer, pl_module):
        row = {
            "trial": trainer.logger.version if trainer.logger else None,
            "rank": trainer.global_rank,
            "pid": os.getpid(),
            "parent": os.getppid(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "port": os.environ.get("MASTER_PORT"),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\\n")
        if trainer.global_rank != 0 or row["parent"] != self.hold:
            return
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            rows = [json.loads(line) for line in open(self.path)]
            if any(r["rank"] == 0 and r["parent"] != self.hold for r in rows):
                return
            time.sleep(0.2)


class PlanProbe(pl.Callback):
    """Appends, when the fit ends, this rank's plan and the epoch it stopped at."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        (injector,) = [c for c in trainer.callbacks if type(c).__name__ == "DropoutInjector"]
        row = {"rank": trainer.global_rank, "epoch": trainer.current_epoch, "plan": injector.plan.to_yaml()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\\n")
'''

DDP = {"devices": 2, "strategy": "ddp", "max_epochs": 1, "limit_train_batches": 2}
STUDY = {"n_trials": 2, "baselines": False, "gap_samples": 0}


def install_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the current folder, holding ``gpuprobe.py``, importable here, in spawned workers and in
    the trial processes (the CLI puts the current folder on ``sys.path`` and ``PYTHONPATH``; set here first, so
    that the test leaves both as they were)."""
    (tmp_path / "gpuprobe.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


@pytest.fixture
def probe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return install_probe(tmp_path, monkeypatch)


@pytest.mark.slow
def test_two_workers_of_two_devices_each_see_their_own_gpus_down_to_every_ddp_rank(
    probe_dir, data_dir, monkeypatch
):
    # a port left in the environment (by a scheduler, or by an earlier DDP run in this process) is not shared
    # by the workers' concurrent trials
    monkeypatch.setenv("MASTER_PORT", "29517")
    record = probe_dir / "seen.jsonl"
    config = write_config(probe_dir, trainer=DDP, study={**STUDY, "workers": 2, "devices": [0, 1, 2, 3]})
    callbacks = [
        {"class_path": "gpuprobe.DeviceProbe", "init_args": {"path": str(record), "hold": os.getpid()}}
    ]
    assert tune(config, probe_dir, data_dir, f"--trainer.callbacks={json.dumps(callbacks)}") == 0
    assert (
        os.environ.get("CUDA_VISIBLE_DEVICES") is None
    )  # worker 0's GPUs were this process's only meanwhile
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    trials = [r for r in rows if r["rank"] == 0]
    assert sorted(r["trial"] for r in trials) == ["trial_0000", "trial_0001"]
    assert len(rows) == 4  # a DDP trial of 2 processes each
    seen = {}
    for rank0 in trials:  # rank 1 is started by rank 0, the trial process, whose parent is its worker
        (rank1,) = [r for r in rows if r["rank"] == 1 and r["parent"] == rank0["pid"]]
        assert rank1["visible"] == rank0["visible"]  # both ranks see their worker's GPUs
        seen[rank0["parent"]] = rank0["visible"]
    # one trial in this process (worker 0), one in the spawned worker; GPUs 0,1 and 2,3: disjoint
    assert len(seen) == 2 and os.getpid() in seen
    assert seen[os.getpid()] == "0,1"
    assert sorted(seen.values()) == ["0,1", "2,3"]
    # each trial its own rendezvous port, below the ephemeral range: another trial's connections never take it
    # (Lightning's own pick is an ephemeral port, lost to them now and then: EADDRINUSE)
    from lightning_dropout.tune.devices import _ephemeral_low

    ports = [int(r["port"]) for r in trials]
    assert len(set(ports)) == 2 and all(port < _ephemeral_low() for port in ports), ports
    assert 29517 not in ports


def test_workers_that_do_not_fit_the_gpus_stop_before_trial_0_saying_what_fits(probe_dir, data_dir, capsys):
    config = write_config(probe_dir, trainer=DDP, study={**STUDY, "workers": 2, "devices": [0, 1, 2]})
    assert tune(config, probe_dir, data_dir) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "2 workers of 2 need 4" in err and "3 GPUs: 1 worker of 2" in err and "--workers 1" in err
    assert not (probe_dir / "runs").exists()  # stopped before the study was opened


def test_workers_auto_fills_the_listed_gpus_and_without_gpus_the_cores(probe_dir, data_dir):
    assert _study_shortcuts(["--workers", "auto"]) == ["--study.workers=auto"]
    config = write_config(
        probe_dir, trainer=DDP, study={**STUDY, "workers": "auto", "devices": list(range(7))}
    )
    data = f"--data.init_args.cache_dir={data_dir}"
    tuner = Tuner(["--config", str(config), data])
    layout = tuner.place_workers()
    assert tuner.study_config.workers == layout.workers == 3  # 7 GPUs // 2 per trial
    assert layout.sets == ("0,1", "2,3", "4,5") and layout.unused == ("6",)
    cpu = Tuner(["--config", str(config), data, "--study.devices=null", "--study.threads=1"])
    cores = len(os.sched_getaffinity(0))
    assert cpu.place_workers().workers == max(1, cores // 2) and cpu.place_workers().sets == ()


def test_study_devices_must_be_distinct_gpus(probe_dir, capsys):
    config = write_config(probe_dir, study={**STUDY, "devices": [0, 0]})
    assert main(["tune", str(config)]) == 2
    assert "`study.devices` must be null" in capsys.readouterr().err


def test_the_gpu_check_script_parses_and_runs_every_tune_check():
    """benchmarks/gpu_check.sh runs only where a GPU is: here, its syntax and that it runs each check of
    benchmarks/gpu_trials.py."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    assert subprocess.run(["bash", "-n", str(root / "gpu_check.sh")]).returncode == 0
    spec = importlib.util.spec_from_file_location("gpu_trials", root / "gpu_trials.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loop = next(
        line for line in (root / "gpu_check.sh").read_text().splitlines() if line.startswith("for check")
    )
    assert sorted(loop.split(" in ")[1].rstrip("; do").split()) == sorted(module.CHECKS)
