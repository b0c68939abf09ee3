"""One tuning trial (or a re-run of a plan) as its own process (``python -m lightning_dropout.tune.trial SPEC``).

Used when the trainer re-launches its script per rank (``strategy: ddp``): Lightning runs this module again
on every rank, rank 0 attaches to the study's trial by id, and rank 0 writes the result file that the study
process reads. Internal: users never call it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from pathlib import Path

import optuna

from lightning_dropout.redaction import redact
from lightning_dropout.tune import trial_io
from lightning_dropout.tune.pruning import MetricNotLoggedError
from lightning_dropout.tune.runner import Tuner


def _global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("GLOBAL_RANK", os.environ.get("LOCAL_RANK", "0"))))


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rank = _global_rank()
    out = Path(spec["out"])
    try:
        tuner = Tuner(trial_io.read_args())
        tuner.pin_threads()
        if "plan" in spec:  # a re-run of a fixed plan with another seed
            result, plan = tuner.train_rerun(spec)
        else:
            # the configured sampler and pruner decide on rank 0 (the sampler is seeded per trial number)
            study = tuner.study()
            if rank == 0:
                # read the trials once: Optuna's storage cache maps a trial id to its study only after that,
                # and an enqueued trial's first suggest writes its fixed parameter without reading
                study.get_trials(deepcopy=False)
            trial = optuna.trial.Trial(study, spec["trial_id"]) if rank == 0 else None
            result, plan = tuner.run_trial(trial, spec.get("values"))
        record = {
            "value": None if result.value is None or math.isnan(result.value) else result.value,
            "metrics": result.metrics,
            "pruned": result.pruned,
            "plan": plan.to_yaml(),
        }
    except MetricNotLoggedError as err:  # the study process stops the study on it
        record = {"fatal": str(err)}
    except Exception as err:  # reported to the study process, which records the reason on the trial
        record = {
            "error": redact(f"{type(err).__name__}: {err}"),
            "traceback": redact(traceback.format_exc()[-4000:]),
        }
    if _global_rank() == 0:
        trial_io.write_result(out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
