"""The config fuzzer: seeded mutations of every file in ``configs/``, each run through ``describe`` and a
one-epoch ``tune`` of the real CLI, in this process.

A mutation deletes a key, gives a value the wrong type, an out-of-range or huge number, a typo or unknown key,
a bad class path, variant, selector or storage URL, a unicode or very long string; or it rewrites the text:
anchors and aliases, merge keys, an alias bomb, a repeated key, deep nesting, a root that is not a mapping.
Every run must end in one of three ways:

- exit 2 and exactly one ``lightning-dropout: error:`` line (the study's own progress lines may come first);
- exit 0 from ``describe`` on input it accepts;
- exit 0 from ``tune`` after a real run: the study trained at least one trial to its end or its pruning.

Anything else is a finding: a traceback (an exception out of ``main``, or ``Traceback`` in the output), another
exit status, exit 0 from a study that trained nothing, or a run past the time limit (a hang).

Before mutating, each config is shrunk so that a valid mutation trains in about a second: one epoch of one
batch on 500 sequences, one trial, no re-runs, one worker, the run directory and the data cache given by the
caller. The keys that shrink it (:data:`PINNED`) are not mutated in the CI run; ``--deep`` gives them wrong types,
typos, strings and bad or small numbers too (not deletions or huge values, which ask for a long real study), over
more cases.

``tests/test_fuzz.py`` runs :data:`CI_CASES` mutations at a fixed seed. The deep mode, run by hand::

    OMP_NUM_THREADS=1 python tests/fuzzing.py --deep --cases 1000 --seed 1 --out fuzz-deep.json

prints one line per finding and a summary; docs/reliability.md holds the last figure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CI_CASES = 150
CI_SEED = 20261203
ERROR_PREFIX = "lightning-dropout: error:"

# the keys that keep a valid mutation to about a second of training (mutated only in --deep)
PINNED = {
    ("trainer", "max_epochs"),
    ("trainer", "limit_train_batches"),
    ("trainer", "limit_val_batches"),
    ("trainer", "num_sanity_val_steps"),
    ("data", "init_args", "num_samples"),
    ("data", "init_args", "cache_dir"),
    ("study", "n_trials"),
    ("study", "seeds"),
    ("study", "workers"),
    ("study", "run_dir"),
    ("study", "budget"),
    ("study", "population"),
}

Path_ = tuple[Any, ...]


def shrink(config: dict[str, Any], run_dir: Path, data_dir: Path) -> dict[str, Any]:
    """``config`` cut to one epoch of one batch, one trial without re-runs, one worker (see the module doc)."""
    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {})
    trainer.update(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer["enable_progress_bar"] = False
    data = config.get("data")
    if isinstance(data, dict):
        data.setdefault("init_args", {}).update(num_samples=500, cache_dir=str(data_dir))
    study = config.get("study")
    if isinstance(study, dict):
        study.pop("budget", None)
        study.update(n_trials=1, seeds=0, workers=1, run_dir=str(run_dir))
    return config


# --- mutations -------------------------------------------------------------------------------------------------


def _paths(node: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _get(node: Any, path: Path_) -> Any:
    for key in path:
        node = node[key]
    return node


def _set(node: Any, path: Path_, value: Any) -> None:
    _get(node, path[:-1])[path[-1]] = value


def _pinned(path: Path_) -> bool:
    """Whether ``path`` is a pinned key, inside one or holds one (deleting ``trainer`` unpins them all)."""
    keys = tuple(k for k in path if isinstance(k, str))
    return any(keys[: len(p)] == p or p[: len(keys)] == keys for p in PINNED)


WRONG_TYPES: list[Any] = ["text", 3, 2.5, True, None, [], {}, [1, 2], {"a": 1}]
NUMBERS: list[Any] = [-1, 0, 1, 2**31, 2**63, 10**100, 1e308, math.nan, math.inf, -math.inf, 1e-300, 0.5, 1.5]
PINNED_KINDS = ("wrong-type", "number", "typo-key", "string")
PINNED_NUMBERS: list[Any] = [-1, 0, 1, math.nan, math.inf, -math.inf, 1e-300, 0.5, 1.5, -(2**63)]
CLASS_PATHS = [
    "no.such.Class",
    "lightning_dropout.zoo.MLPP",
    "torch.nn.Linear",
    "os.system",
    "",
    "lightning_dropout.zoo",
    "lightning_dropout.data.MNIST1DDataModule",
]
VARIANTS: list[Any] = [
    ["standrd"],
    [],
    "standard",
    ["standard", "no_such"],
    [None],
    [{"standard": 1}],
    ["alpha"],
]
SELECTORS: list[Any] = [
    {"match": "("},
    {"mtch": "Linear"},
    {"match": ""},
    {"type": "NoSuchLayer"},
    {},
    "Linear",
    {"match": "Linear", "exclude": 3},
    None,
]
STORAGES = [
    "postgresql://user:pa?ss@127.0.0.1:1/db",
    "sqlite:////proc/nope/s.db",  # unwritable, even as root
    "mysql://",
    "journal:/dev/null",
    "",
    "redis://127.0.0.1:1",
    "sqlite://",
    "not a url",
    "sqlite:///" + "x" * 300 + "/s.db",
]
STRINGS = ["é😀\u202e", "x" * 20_000, "", " ", "\t", "../..", "a\nb", "${HOME}", "%s%n"]


TREE_KINDS = [
    "delete",
    "wrong-type",
    "number",
    "typo-key",
    "unknown-key",
    "class-path",
    "variant",
    "selector",
    "storage",
    "string",
]


def _typo(key: str, rng: random.Random) -> str:
    if len(key) < 2:
        return key + "x"
    i = rng.randrange(len(key) - 1)
    return rng.choice(
        [key[:i] + key[i + 1] + key[i] + key[i + 2 :], key[:i] + key[i + 1 :], key + key[-1], key.upper()]
    )


@dataclass(frozen=True)
class Mutation:
    """One mutated config: its text, where it came from and what was done."""

    source: str
    kind: str
    where: str
    text: str


def _tree_mutation(config: dict[str, Any], rng: random.Random, deep: bool) -> tuple[str, str, Any] | None:
    """A change to one node of the parsed ``config``: (kind, where, new config)."""
    kind = rng.choice(TREE_KINDS)
    # a pinned key (--deep only) takes a bad or small value: deleting it or making it huge would ask for a
    # real, long study (Lightning's default is 1000 epochs), which is no finding
    paths = [p for p in _paths(config) if not _pinned(p) or (deep and kind in PINNED_KINDS)]
    if not paths:
        return None
    config = copy.deepcopy(config)
    if kind == "class-path":
        candidates = [p for p in paths if p[-1] == "class_path"]
    elif kind == "variant":
        candidates = [p for p in paths if p[-1] in ("variants", "variant")]
    elif kind == "selector":
        candidates = [p for p in paths if p[-1] in ("select", "match", "type", "names")]
    elif kind == "number":
        candidates = [p for p in paths if isinstance(_get(config, p), (int, float))] or paths
    elif kind == "string":
        candidates = [p for p in paths if isinstance(_get(config, p), str)] or paths
    elif kind in ("typo-key", "unknown-key"):
        candidates = [p for p in paths if isinstance(p[-1], str)]
    else:
        candidates = paths
    if kind == "storage":
        study = config.get("study")
        if not isinstance(study, dict):
            return None
        study["storage"] = rng.choice(STORAGES)
        return kind, "study.storage", config
    if not candidates:
        return None
    path = rng.choice(candidates)
    where = ".".join(str(k) for k in path)
    if kind == "delete":
        del _get(config, path[:-1])[path[-1]]
    elif kind == "typo-key":
        parent = _get(config, path[:-1])
        parent[_typo(path[-1], rng)] = parent.pop(path[-1])
    elif kind == "unknown-key":
        parent = _get(config, path[:-1])
        parent[rng.choice(["bogus", "n_trial", "lr", "dropout_rate", "Ü"])] = rng.choice(WRONG_TYPES)
    else:
        pool = {
            "wrong-type": WRONG_TYPES,
            "number": NUMBERS,
            "class-path": CLASS_PATHS,
            "variant": VARIANTS,
            "selector": SELECTORS,
            "string": STRINGS,
        }[kind]
        if kind == "number" and _pinned(path):
            pool = PINNED_NUMBERS
        _set(config, path, copy.deepcopy(rng.choice(pool)))
    return kind, where, config


def _dump(config: Any) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=10_000)


def _text_mutation(config: dict[str, Any], text: str, rng: random.Random) -> tuple[str, str, str]:
    """A change to the YAML text: (kind, where, new text)."""
    kind = rng.choice(["alias", "merge", "alias-bomb", "repeated-key", "deep-nesting", "root"])
    if kind == "alias":  # the same node twice: PyYAML writes an anchor and an alias
        shared = copy.deepcopy(config)
        section = rng.choice([k for k, v in shared.items() if isinstance(v, (dict, list))] or ["model"])
        target = rng.choice([k for k in shared if k != section] or [section])
        shared[target] = shared.get(section)
        return kind, f"{target} = *{section}", yaml.dump(shared, sort_keys=False, width=10_000)
    if kind == "merge":
        sections = [k for k, v in config.items() if isinstance(v, dict)]
        if not sections:
            return "root", "document", "[]"
        section = rng.choice(sections)
        extra = rng.choice(
            ["{enable_model_summary: false}", "*nothing", "{}", "[1, 2]", "{accelerator: cpu}"]
        )
        anchor = "x-defaults: &nothing {}\n" if extra == "*nothing" else ""
        lines = (anchor + text).splitlines()
        at = lines.index(f"{section}:") if f"{section}:" in lines else 0
        lines.insert(at + 1, f"  <<: {extra}")
        return kind, f"{section}.<<", "\n".join(lines) + "\n"
    if kind == "alias-bomb":
        rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
        return kind, "document", "\n".join(rows) + "\n" + text
    if kind == "repeated-key":
        lines = text.splitlines()
        keyed = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("-")]
        i = rng.choice(keyed)
        lines.insert(i + 1, lines[i] if lines[i].rstrip().endswith(":") is False else lines[i] + " {}")
        return kind, lines[i].split(":")[0].strip(), "\n".join(lines) + "\n"
    if kind == "deep-nesting":
        depth = rng.choice([200, 5_000])
        return kind, "study", text + "study_extra: " + "[" * depth + "]" * depth + "\n"
    root = rng.choice(
        ["[]", "42", "", "null", "- a\n- b\n", "'x'", "{", ":\n", "\t", "\x00", "? [a, b]\n: c\n"]
    )
    return "root", "document", root


def mutations(
    n: int, seed: int, deep: bool = False, run_dir: Path | None = None, data_dir: Path | None = None
):
    """``n`` mutations at ``seed``, spread over ``configs/*.yaml`` in turn (the same seed gives the same list)."""
    rng = random.Random(seed)
    run_dir = run_dir or Path("runs")
    data_dir = data_dir or Path("data")
    out: list[Mutation] = []
    bases = [(p.stem, shrink(yaml.safe_load(p.read_text()), run_dir, data_dir)) for p in CONFIGS]
    while len(out) < n:
        source, config = bases[len(out) % len(bases)]
        text = _dump(config)
        if rng.random() < 0.75:
            changed = _tree_mutation(config, rng, deep)
            if changed is None:
                continue
            kind, where, new = changed
            text = _dump(new)
        else:
            kind, where, text = _text_mutation(config, text, rng)
        out.append(Mutation(source, kind, where[:80], text))
    return out


# --- running ---------------------------------------------------------------------------------------------------


class Hang(BaseException):
    """A run past its time limit (a BaseException: a trial's own error handling must not swallow it)."""


@contextlib.contextmanager
def _captured() -> Iterator[dict[str, str]]:
    """What the block writes to stdout and stderr: through ``sys.stdout``/``sys.stderr`` (swapped for files:
    pytest's capture has swapped them too) and to the file descriptors 1 and 2 (C code, child processes)."""
    result: dict[str, str] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = (sys.stdout, sys.stderr)
    with contextlib.ExitStack() as files:
        raw = [files.enter_context(tempfile.TemporaryFile("w+b")) for _ in range(2)]
        text = [
            files.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace"))
            for _ in range(2)
        ]
        os.dup2(raw[0].fileno(), 1)
        os.dup2(raw[1].fileno(), 2)
        sys.stdout, sys.stderr = text
        try:
            yield result
        finally:
            for stream in text:
                stream.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            for name, fd_file, stream in (("out", raw[0], text[0]), ("err", raw[1], text[1])):
                fd_file.seek(0)
                stream.seek(0)
                result[name] = stream.read() + fd_file.read().decode("utf-8", "replace")


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    """What one command did with one mutation."""

    command: str
    rc: int | None
    seconds: float
    finding: str | None = None  # None: one of the allowed endings
    line: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _storage_of(config: Path) -> str | None:
    """The storage a config's study lives in: its ``study.storage``, else the run directory's SQLite file (both
    as the config gives them, relative to its folder), if the config parses that far."""
    with contextlib.suppress(Exception):
        study = yaml.safe_load(config.read_text(encoding="utf-8"))["study"]
        storage = study.get("storage")
        if isinstance(storage, str) and storage:
            return storage
        folder = config.parent / str(study.get("run_dir") or "runs") / str(study["name"])
        return f"sqlite:///{folder.resolve() / 'study.db'}"
    return None


def _trained(run_dir: Path, storage: str | None = None) -> bool | None:
    """Whether a study stored under ``run_dir`` (or in ``storage``) has a trial that ran to its end or its
    pruning (None: no storage found)."""
    import optuna

    urls = [f"sqlite:///{path}" for path in glob.glob(str(run_dir / "**" / "*.db"), recursive=True)]
    if storage is not None:
        urls.append(storage)
    if not urls:
        return None
    for url in urls:
        with contextlib.suppress(Exception):
            for summary in optuna.get_all_study_summaries(url):
                study = optuna.load_study(study_name=summary.study_name, storage=url)
                states = {t.state for t in study.get_trials(deepcopy=False)}
                if states & {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}:
                    return True
    return False


def run_one(command: str, config: Path, run_dir: Path, limit: float) -> Outcome:
    """``lightning-dropout <command> <config>`` in this process, classified (see the module doc)."""
    from lightning_dropout.cli import main

    environ = dict(os.environ)
    cwd = os.getcwd()
    os.chdir(config.parent)
    start = time.perf_counter()
    rc: int | None = None
    raised: BaseException | None = None
    try:
        with _captured() as output, _time_limit(limit):
            try:
                rc = main([command, str(config)])
            except Hang:
                raise
            except BaseException as err:  # whatever escapes main is a finding
                raised = err
    except Hang as err:
        return Outcome(command, None, time.perf_counter() - start, f"hang: {err}")
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    seconds = time.perf_counter() - start
    text = output["out"] + output["err"]
    errors = [line for line in output["err"].splitlines() if line.startswith(ERROR_PREFIX)]
    line = errors[-1] if errors else ""
    if raised is not None:
        return Outcome(command, None, seconds, f"traceback: {type(raised).__name__}: {str(raised)[:300]}")
    if "Traceback (most recent call last)" in text:
        tail = [t for t in text.splitlines() if t.strip()][-1:]
        return Outcome(command, rc, seconds, f"traceback in the output: {tail}", line)
    if rc == 2:
        if len(errors) != 1:
            return Outcome(command, rc, seconds, f"exit 2 with {len(errors)} error lines: {errors[:3]}", line)
        return Outcome(command, rc, seconds, None, line)
    if rc == 0:
        if command == "tune" and _trained(run_dir, _storage_of(config)) is not True:
            return Outcome(command, rc, seconds, "exit 0 from a study that trained nothing", line)
        return Outcome(command, rc, seconds, None, line)
    return Outcome(command, rc, seconds, f"exit {rc}: {output['err'].strip().splitlines()[-1:]}", line)


def run_mutation(mutation: Mutation, work: Path, limit: float) -> list[Outcome]:
    """``describe`` then ``tune`` on one mutation, written under ``work`` (its runs go to ``work/runs``)."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / f"{mutation.source}.yaml"
    config.write_text(mutation.text, encoding="utf-8")
    return [run_one(command, config, work / "runs", limit) for command in ("describe", "tune")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--deep", action="store_true", help="mutate the pinned keys too (bad or small values)"
    )
    parser.add_argument("--cases", type=int, default=CI_CASES)
    parser.add_argument("--seed", type=int, default=CI_SEED)
    parser.add_argument("--limit", type=float, default=None, help="seconds a run may take (default 120)")
    parser.add_argument("--out", type=Path, default=None, help="write every outcome here as JSON")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    limit = args.limit or 120.0
    counts: Counter[str] = Counter()
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        cases = mutations(args.cases, args.seed, args.deep, base / "RUN", base / "data")
        for i, mutation in enumerate(cases):
            work = base / f"case{i:05d}"
            text = mutation.text.replace(str(base / "RUN"), str(work / "runs"))
            outcomes = run_mutation(
                Mutation(mutation.source, mutation.kind, mutation.where, text), work, limit
            )
            for o in outcomes:
                counts[f"{o.command} " + ("finding" if o.finding else f"exit {o.rc}")] += 1
                if o.seconds > 20:
                    print(
                        f"case {i} {mutation.source} {mutation.kind} {mutation.where}: {o.command} took "
                        f"{o.seconds:.0f} s (exit {o.rc})",
                        flush=True,
                    )
                if o.finding:
                    print(
                        f"case {i} {mutation.source} {mutation.kind} {mutation.where}: {o.command}: {o.finding}"
                    )
                rows.append(
                    {
                        "case": i,
                        "source": mutation.source,
                        "kind": mutation.kind,
                        "where": mutation.where,
                        "command": o.command,
                        "rc": o.rc,
                        "seconds": round(o.seconds, 3),
                        "finding": o.finding,
                        "line": o.line[:300],
                    }
                )
    runs = len(rows)
    findings = sum(1 for r in rows if r["finding"])
    summary = {
        "cases": args.cases,
        "runs": runs,
        "findings": findings,
        "seed": args.seed,
        "deep": args.deep,
        "seconds": round(time.perf_counter() - start, 1),
        "outcomes": dict(sorted(counts.items())),
    }
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=1))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
