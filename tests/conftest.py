"""Shared fixtures: a PostgreSQL server for the storage tests.

``postgres_url`` is ``$LIGHTNING_DROPOUT_TEST_POSTGRES`` (``.ci/run`` starts a throwaway cluster and sets it);
without it the fixture starts its own throwaway cluster when the PostgreSQL server binaries are installed. If
neither works the tests skip, except under CI (``$CI`` set), where they fail: CI must never skip them silently.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_ENV_VAR = "LIGHTNING_DROPOUT_TEST_POSTGRES"


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    if _under_ci():
        pytest.fail(f"PostgreSQL is required under CI ($CI is set), but {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


def _with_driver(url: str) -> str:
    """Name an installed driver in a bare ``postgresql://`` URL (SQLAlchemy >= 2.1 defaults to psycopg 3,
    older versions to psycopg2; either may be the one installed)."""
    if not url.startswith("postgresql://"):
        return url
    for module, scheme in (("psycopg", "postgresql+psycopg://"), ("psycopg2", "postgresql+psycopg2://")):
        if importlib.util.find_spec(module) is not None:
            return scheme + url[len("postgresql://") :]
    return url


def _pg_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres (PATH first, then the distributions' locations)."""
    candidates = []
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).resolve().parent)

    def version(path: str) -> tuple[int, ...]:
        digits = "".join(c if c.isdigit() else " " for c in path).split()
        return tuple(int(d) for d in digits)

    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/opt/homebrew/opt/postgresql*/bin"):
        candidates.extend(Path(p) for p in sorted(glob.glob(pattern), key=version, reverse=True))
    for bindir in candidates:
        if all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _throwaway_cluster(bindir: Path) -> Iterator[str]:
    """initdb + pg_ctl start a trust-auth cluster on a free local port; yields its URL; stops and deletes it."""
    root = os.geteuid() == 0
    user_prefix: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="ld-test-pg.", dir="/tmp" if root else None))
    if root:  # postgres refuses to run as root: run it as the postgres account in a dir it owns
        os_user = "postgres"
        try:
            shutil.chown(tmp, user=os_user)
        except LookupError:
            os_user = "nobody"
            shutil.chown(tmp, user=os_user)
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError("running as root needs `runuser` to start PostgreSQL as another user")
        user_prefix = [runuser, "-u", os_user, "--"]

    def run(*cmd: str) -> None:
        proc = subprocess.run(
            [*user_prefix, *cmd], cwd=tmp, capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{Path(cmd[0]).name} failed ({proc.returncode}): {proc.stderr or proc.stdout}"
            )

    data, role, db = tmp / "data", "ld_test", "ld_test"
    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", role, "--auth=trust", "-E", "UTF8", "--no-sync")
        port = _free_port()
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(tmp / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "start",
        )
        started = True
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", role, db)
        yield f"postgresql://{role}@127.0.0.1:{port}/{db}"
    finally:
        if started:
            with contextlib.suppress(Exception):
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of an empty-enough PostgreSQL database (tests use unique study names)."""
    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is None:
        _unavailable("no PostgreSQL driver is installed (`pip install -e '.[dev]'` brings psycopg 3)")
    url = os.environ.get(POSTGRES_ENV_VAR)
    if url:
        yield _with_driver(url)
        return
    bindir = _pg_bindir()
    if bindir is None:
        _unavailable(f"${POSTGRES_ENV_VAR} is unset and no initdb/pg_ctl/postgres binaries were found")
    assert bindir is not None
    try:
        cluster = _throwaway_cluster(bindir)
        url = cluster.__enter__()
    except Exception as err:
        _unavailable(f"${POSTGRES_ENV_VAR} is unset and starting a throwaway cluster failed: {err}")
    try:
        yield _with_driver(url)
    finally:
        cluster.__exit__(None, None, None)
