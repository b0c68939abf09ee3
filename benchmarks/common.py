"""Helpers shared by the benchmark scripts (each script runs standalone: ``python benchmarks/<name>.py`` puts
this folder on ``sys.path``)."""

from __future__ import annotations

import contextlib
import logging
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def markdown_table(rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table: ``rows[0]`` is the header; every other column is right-aligned."""
    align = "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"
    return ["| " + " | ".join(rows[0]) + " |", align, *("| " + " | ".join(row) + " |" for row in rows[1:])]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's and Optuna's warnings and info lines for the block."""
    from lightning_dropout.config import quiet_lightning

    optuna_log = logging.getLogger("optuna")
    level = optuna_log.level
    with warnings.catch_warnings(), quiet_lightning():
        warnings.simplefilter("ignore")
        optuna_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            optuna_log.setLevel(level)
