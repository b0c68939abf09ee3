"""The `tune` checks of the GPU check (``benchmarks/gpu_check.sh``): real studies on CUDA, each printing one line.

    python benchmarks/gpu_trials.py ddp-gap   DIR   # one 2-GPU DDP trial with the gap monitor
    python benchmarks/gpu_trials.py workers   DIR   # --workers 2 on 2 GPUs: each worker's trials on its own GPU
    python benchmarks/gpu_trials.py bf16      DIR   # one bf16-mixed trial
    python benchmarks/gpu_trials.py workers   DIR --cpu   # the check's own plumbing on a CPU (no CUDA fields)

Each check writes its config, data and study under DIR (a fresh folder) and prints ``<check>: PASS|FAIL|SKIP
<why>``; the exit status is 1 on FAIL, else 0. The ``workers`` check reads, in every trial process, its
``CUDA_VISIBLE_DEVICES``, ``torch.cuda.current_device()`` and that device's PCI bus id, and asserts that the two
workers' trials ran on different GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

PROBE = '''
import json, os, time
import lightning.pytorch as pl
import torch


def _bus(index):
    props = torch.cuda.get_device_properties(index)
    if hasattr(props, "pci_bus_id"):
        return f"{getattr(props, 'pci_domain_id', 0):04x}:{props.pci_bus_id:02x}:{getattr(props, 'pci_device_id', 0):02x}"
    return str(getattr(props, "uuid", "unknown"))


class GpuProbe(pl.Callback):
    """Appends what this trial process sees; the first trial of process `hold` waits (at most 120 s) until a
    trial of another worker has started, so that both workers train one."""

    def __init__(self, path: str, hold: int = 0) -> None:
        self.path, self.hold = path, hold

    def on_train_start(self, trainer, pl_module):
        row = {"pid": os.getpid(), "rank": trainer.global_rank, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            row["device"] = torch.cuda.current_device()
            row["bus"] = _bus(row["device"])
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\\n")
        if os.getpid() != self.hold:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(json.loads(line)["pid"] != self.hold for line in open(self.path)):
                return
            time.sleep(0.2)
'''


def _config(out: Path, trainer: dict[str, Any], study: dict[str, Any]) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_dropout.zoo.MLP", "init_args": {"hidden": 64}},
        "data": {
            "class_path": "lightning_dropout.data.MNIST1DDataModule",
            "init_args": {"batch_size": 100, "cache_dir": str(out / "data")},
        },
        "trainer": {
            "accelerator": "gpu",
            "devices": 1,
            "max_epochs": 2,
            "limit_train_batches": 10,
            "limit_val_batches": 2,
            "enable_checkpointing": False,
            **trainer,
        },
        "dropout": {
            "groups": [
                {"name": "hidden", "select": {"match": "Linear"}, "variants": ["standard"], "p": [0.05, 0.5]}
            ]
        },
        "study": {
            "name": "gpu",
            "metric": "val_loss",
            "direction": "minimize",
            "n_trials": 1,
            "seeds": 0,
            "baselines": False,
            "warm_start": False,
            "pruner": None,
            "run_dir": str(out / "runs"),
            **study,
        },
    }
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _tune(config: Path, *extra: str) -> optuna.Study:
    from lightning_dropout.cli import main

    code = main(["tune", str(config), *extra])
    if code != 0:
        raise AssertionError(f"tune exited with {code}")
    return optuna.load_study(
        study_name="gpu", storage=f"sqlite:///{config.parent / 'runs' / 'gpu' / 'study.db'}"
    )


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def check_ddp_gap(out: Path, cpu: bool) -> str:
    """One trial on 2 GPUs (DDP, a trial process re-launched per rank) with the gap monitor."""
    if not cpu and _gpus() < 2:
        return f"SKIP needs 2 GPUs, {_gpus()} visible"
    trainer = {"devices": 2, "strategy": "ddp", **({"accelerator": "cpu"} if cpu else {})}
    study = _tune(_config(out, trainer, {"gap_samples": 256}))
    (trial,) = study.get_trials()
    gaps = {k: v for k, v in trial.user_attrs.get("metrics", {}).items() if k.startswith("gap_at_best/")}
    assert trial.state.name == "COMPLETE", f"trial {trial.state.name}: {trial.user_attrs.get('fail_reason')}"
    assert gaps, f"no gap_at_best metric in {sorted(trial.user_attrs.get('metrics', {}))}"
    return "PASS " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(gaps.items()))


def check_workers(out: Path, cpu: bool) -> str:
    """--workers 2 on 2 GPUs, trainer.devices 1: each worker's trial on its own GPU."""
    if not cpu and _gpus() < 2:
        return f"SKIP needs 2 GPUs, {_gpus()} visible"
    (out / "gpuprobe.py").write_text(PROBE)
    os.chdir(
        out
    )  # the CLI puts the current folder on sys.path and PYTHONPATH: every worker imports the probe
    record = out / "seen.jsonl"
    callbacks = [{"class_path": "gpuprobe.GpuProbe", "init_args": {"path": str(record), "hold": os.getpid()}}]
    trainer = {"accelerator": "cpu"} if cpu else {}
    study_keys = {"n_trials": 2, "workers": 2, **({"devices": [0, 1]} if cpu else {})}
    study = _tune(_config(out, trainer, study_keys), f"--trainer.callbacks={json.dumps(callbacks)}")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 2
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len({r["pid"] for r in rows}) == 2, f"one process ran both trials: {rows}"
    visible = sorted(r["visible"] for r in rows)
    assert visible == ["0", "1"] if cpu else len(set(visible)) == 2, f"CUDA_VISIBLE_DEVICES: {visible}"
    if not cpu:
        buses = {r["bus"] for r in rows}
        assert all(r["device"] == 0 for r in rows), (
            f"current_device: {rows}"
        )  # each sees its one GPU as cuda:0
        assert len(buses) == 2, f"both workers' trials ran on the GPU at PCI {buses}"
        return f"PASS worker GPUs {visible}, PCI bus ids {sorted(buses)}"
    return f"PASS (CPU plumbing only) CUDA_VISIBLE_DEVICES {visible}"


def check_bf16(out: Path, cpu: bool) -> str:
    """One trial in bf16-mixed precision."""
    if not cpu and _gpus() < 1:
        return "SKIP needs a GPU"
    trainer = {"precision": "bf16-mixed", **({"accelerator": "cpu"} if cpu else {})}
    study = _tune(_config(out, trainer, {}))
    (trial,) = study.get_trials()
    assert trial.state.name == "COMPLETE", f"trial {trial.state.name}: {trial.user_attrs.get('fail_reason')}"
    return f"PASS val_loss {trial.value:.4f}"


CHECKS = {"ddp-gap": check_ddp_gap, "workers": check_workers, "bf16": check_bf16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("out", type=Path, help="a fresh folder for the config, data and study")
    parser.add_argument("--cpu", action="store_true", help="check the plumbing on a CPU (no CUDA fields)")
    ns = parser.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        line = CHECKS[ns.check](ns.out.resolve(), ns.cpu)
    except Exception as err:
        line = f"FAIL {type(err).__name__}: {err}"
    print(f"{ns.check}: {line} ({time.monotonic() - start:.0f} s)", flush=True)
    return 1 if line.startswith("FAIL") else 0


if __name__ == "__main__":
    sys.exit(main())
