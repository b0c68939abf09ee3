"""Trials larger than one machine (``trainer.num_nodes > 1``): the cluster's launcher starts every rank.

Under ``torchrun`` or SLURM's ``srun`` (Lightning's ``TorchElasticEnvironment`` / ``SLURMEnvironment``), every
rank of every node runs ``lightning-dropout tune CONFIG``. Global rank 0 (rank 0 of node 0) runs the study: it
alone opens the storage, asks Optuna for trials and stores their results. Before each training it sends the job
(a trial and its ``search:`` values, or a re-run's plan and seed) to the other ranks over a gloo group of the
job's process group; they train it with it (:meth:`~lightning_dropout.tune.runner.Tuner.run_trial` without a
trial: the plan and every pruning decision come from rank 0 by broadcast, as for one machine) and wait for the
next job, until rank 0 says the study is done. Lightning reuses the process group for every trial.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from lightning_dropout.errors import DropoutConfigError

if TYPE_CHECKING:
    from lightning_dropout.tune.runner import Tuner

__all__ = ["Channel", "launched_rank"]

log = logging.getLogger(__name__)


def launched_rank(tuner: Tuner) -> int | None:
    """This process's global rank when the cluster's launcher started the ranks of a multi-process trainer
    (``torchrun``, ``srun``); ``None`` otherwise (one process, or Lightning launching the ranks itself)."""
    trainer: Any = tuner.cli.trainer
    env = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size <= 1 or env is None or not env.creates_processes_externally:
        return None
    return int(env.global_rank())


class Channel:
    """The jobs global rank 0 sends to the other ranks of a launched trainer. Creating it joins the job's
    process group (every rank must create it, in the same order)."""

    def __init__(self, tuner: Tuner) -> None:
        cfg = tuner.study_config
        if cfg.workers != 1 or cfg.method != "trials":
            raise DropoutConfigError(
                "`study.workers` must be 1 and `study.method` trials when the launcher starts the ranks of a "
                f"multi-node trial (torchrun, srun), but got workers={cfg.workers!r}, method={cfg.method!r}; "
                "start more such jobs on the same storage instead."
            )
        strategy: Any = tuner.cli.trainer.strategy
        strategy.setup_distributed()  # the process group every trial's trainer reuses
        self.group = dist.new_group(backend="gloo")  # the jobs, whatever the training's backend
        self.rank = dist.get_rank()

    def send(self, job: dict[str, Any]) -> None:
        """Rank 0: tell the other ranks what to train next (``{"kind": "stop"}`` ends them)."""
        dist.broadcast_object_list([job], src=0, group=self.group)

    def receive(self) -> dict[str, Any]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return dict(box[0])

    def close(self) -> None:
        """Every rank, once the study is done: wait for the others, then leave the process group together, so
        no rank exits while another still talks to it (or to the launcher's store)."""
        dist.barrier(group=self.group)
        dist.destroy_process_group()

    def follow(self, tuner: Tuner) -> int:
        """A rank other than 0: train each job rank 0 sends until it says stop; return the number trained."""
        done = 0
        while True:
            job = self.receive()
            if job["kind"] == "stop":
                return done
            try:
                if job["kind"] == "trial":
                    tuner.run_trial(None, job.get("values"))
                else:
                    tuner.train_rerun(job)
            except Exception as err:  # rank 0 records the trial's failure; this rank waits for the next job
                log.warning("rank %d: %s failed: %s", self.rank, job["kind"], f"{type(err).__name__}: {err}")
            done += 1
