"""The launch recipes of docs/getting-started/scale.md, run as far as the CPU allows: the SLURM array script's
body with the array variables set (no sbatch), the Kubernetes Job's container command run here, and the torchrun
multi-node script with real torchrun, 2 "machines" x 1 process on this one (gloo)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from studies import write_config
from test_scale import STUDY, install_probe

from lightning_dropout.tune import open_study

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment with the venv's scripts (`lightning-dropout`, `torchrun`) first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **extra}
    env.pop("LIGHTNING_DROPOUT_STORAGE", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


@pytest.fixture
def probe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return install_probe(tmp_path, monkeypatch)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> list[str]:
    """What each of ``procs`` wrote to its log; none outlives the test (a rank left waiting is killed, and the
    logs, not a timeout's traceback, then say where each rank was)."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [log.read_text(errors="replace") for log in logs]


def test_slurm_array_tasks_join_one_study_whose_storage_comes_from_the_environment(tmp_path, data_dir):
    script = EXAMPLES / "slurm_array.sh"
    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert any(line.startswith("#SBATCH --array=") for line in header)
    code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any("postgresql://user" in line for line in code)  # the URL comes from the environment only
    config = write_config(tmp_path, study={**STUDY, "n_trials": 2})
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    test_only = ["--study.workers=1", f"--data.init_args.cache_dir={data_dir}"]  # after the script's `auto`
    cmd = ["bash", str(script), str(config), *test_only]
    # without the URL in the environment, the task stops at once and says so
    refused = subprocess.run(cmd, env=_env(tmp_path, SLURM_ARRAY_TASK_ID="0"), capture_output=True, text=True)
    assert refused.returncode != 0 and "LIGHTNING_DROPOUT_STORAGE" in refused.stderr
    outputs = []
    for task in ("0", "1"):  # the tasks of an array, as sbatch starts them (here one after the other)
        env = _env(
            tmp_path, SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_JOB_ID="77", LIGHTNING_DROPOUT_STORAGE=storage
        )
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stderr)
    assert all(
        f"study s in {storage}" in out.replace("\n", "") for out in outputs
    )  # both joined the one study
    trials = open_study("s", storage).get_trials()
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["task_0", "task_1"]
    assert list((tmp_path / "runs" / "task_0" / "s" / "trials").iterdir())  # task 0 trained the trials
    assert not list((tmp_path / "runs").rglob("*.db"))  # no study of its own in any task's folder


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` references in a container's command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def test_kubernetes_job_pods_get_the_storage_from_a_secret_and_their_command_runs(tmp_path, data_dir):
    text = (EXAMPLES / "k8s_job.yaml").read_text()
    assert "postgresql://" not in text.split("\napiVersion")[1]  # a URL only in the comment's example
    (job,) = [doc for doc in yaml.safe_load_all(text) if doc and doc.get("kind") == "Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] > 1
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["LIGHTNING_DROPOUT_STORAGE"]["valueFrom"]  # never a literal value
    assert "job-completion-index" in env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    # pod 0 here: its mounts are folders under tmp_path, the config in the ConfigMap's place
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in container["volumeMounts"]}
    mounts["/config"].mkdir()
    write_config(mounts["/config"], study={**STUDY, "n_trials": 1})
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    pod_env = _env(tmp_path, LIGHTNING_DROPOUT_STORAGE=storage, POD_INDEX="0")
    argv = [_expand(a, pod_env) for a in [*container["command"], *container["args"]]]
    for path, local in mounts.items():
        argv = [a.replace(f"{path}/", f"{local}/") for a in argv]
    argv += ["--study.workers=1", f"--data.init_args.cache_dir={data_dir}"]  # this machine: one worker
    done = subprocess.run(argv, env=pod_env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [t.state.name for t in open_study("s", storage).get_trials()] == ["COMPLETE"]
    assert list((mounts["/runs"] / "pod_0" / "s" / "trials").iterdir())


@pytest.mark.slow
def test_torchrun_recipe_runs_a_two_machine_trial_as_one_optuna_trial_driven_by_rank_0(probe_dir, data_dir):
    """Point 2 of the multi-node story: 2 "machines" x 1 process (gloo) under torchrun, every rank running `tune`.
    Rank 0 of node 0 alone opens the study; node 1 trains the same plan and stops when the pruner stops rank 0."""
    record = probe_dir / "plans.jsonl"
    config = write_config(
        probe_dir,
        trainer={"max_epochs": 3, "limit_train_batches": 2},
        study={
            **STUDY,
            "n_trials": 1,
            "prune_after": 0,
            # val_acc of this tiny model stays far below 0.99: pruned at the first validation (epoch 0 of 3)
            "pruner": {"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 0.99}},
        },
    )
    callbacks = [{"class_path": "gpuprobe.PlanProbe", "init_args": {"path": str(record)}}]
    overrides = [
        f"--study.run_dir={probe_dir / 'runs'}",
        f"--data.init_args.cache_dir={data_dir}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
    ]
    common = {"NNODES": "2", "NPROC": "1", "ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"}
    common["MASTER_PORT"] = str(_free_port())
    storage = f"sqlite:///{probe_dir / 'study.db'}"
    elsewhere = (
        f"sqlite:///{probe_dir / 'node1.db'}"  # node 1 would find a study of its own here if it opened one
    )
    logs = [probe_dir / f"node{node}.log" for node in (0, 1)]
    procs = [
        subprocess.Popen(
            ["bash", str(EXAMPLES / "torchrun_multinode.sh"), str(config), *overrides],
            env=_env(
                probe_dir,
                **common,
                NODE_RANK=str(node),
                LIGHTNING_DROPOUT_STORAGE=elsewhere if node else storage,
            ),
            cwd=probe_dir,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node, log in enumerate(logs)
    ]
    outputs = _finish(procs, logs)
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], "\n".join(
        f"--- node {n}: exit {c}\n{out[-6000:]}"
        for n, (c, out) in enumerate(zip(codes, outputs, strict=True))
    )
    assert not (probe_dir / "node1.db").exists()
    (trial,) = open_study("s", storage).get_trials()  # one Optuna trial for both machines
    assert trial.state.name == "PRUNED" and sorted(trial.intermediate_values) == [0]
    rows = sorted((json.loads(line) for line in record.read_text().splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1]
    assert rows[0]["plan"] == rows[1]["plan"] == trial.user_attrs["plan"]  # the plan rank 0 sampled, on both
    assert [r["epoch"] for r in rows] == [1, 1]  # both stopped after epoch 0 of 3: the pruning reached node 1
