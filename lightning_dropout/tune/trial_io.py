"""The files a multi-process (DDP) trial exchanges with the study process, kept free of secrets.

The study process writes ``trial_io/<name>.json`` (the job: a trial id or a plan and seed, and where to write
the result) and passes the config arguments, which may hold the storage URL's password, in the environment
variable ``LIGHTNING_DROPOUT_TRIAL_ARGS`` (inherited by every rank, never written to disk). Both files are
readable by their owner only (the result is read back, and a re-run of the trial replaces both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ARGS_ENV", "read_args", "read_result", "write_private", "write_result", "write_spec"]

ARGS_ENV = "LIGHTNING_DROPOUT_TRIAL_ARGS"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (its directory 0700), replacing any older file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def write_spec(spec: Path, out: Path, job: dict[str, Any], args: Sequence[str]) -> dict[str, str]:
    """Write the job file; return the environment for the trial process (with the config arguments)."""
    out.unlink(missing_ok=True)
    write_private(spec, json.dumps({"out": str(out), **job}))
    return {**os.environ, ARGS_ENV: json.dumps(list(args))}


def read_args() -> list[str]:
    """The config arguments, in the trial process."""
    return list(json.loads(os.environ[ARGS_ENV]))


def write_result(out: Path, record: dict[str, Any]) -> None:
    write_private(out, json.dumps(record))


def read_result(out: Path) -> dict[str, Any] | None:
    """The trial's result (``None`` when the process wrote none)."""
    return json.loads(out.read_text()) if out.is_file() else None
