"""A private PostgreSQL server for tests: initdb + pg_ctl in a temporary directory.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/*/bin``);
psycopg 3 is the client. The server listens on 127.0.0.1 on a free port with ``trust``
authentication and is started once per test session; each test gets a fresh database
(``postgres_url``). Running as root, the server runs as the ``postgres`` user (PostgreSQL
refuses to run as root).

If the binaries or psycopg are missing the fixtures skip, except when ``CI=true``: then
they fail.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import free_port

__all__ = ["pg_server", "postgres_url"]


def _missing(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The base URL (``postgresql://postgres@127.0.0.1:PORT``) of a running server."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        _missing("PostgreSQL not found under /usr/lib/postgresql (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401, PLC0415 - only to check it is there
    except ImportError:
        _missing("psycopg 3 is not installed (pip install 'psycopg[binary]')")
    assert bin_dir is not None
    # Not under pytest's tmp: as root that is 0700 and the postgres user cannot enter it.
    root = Path(tempfile.mkdtemp(prefix="edgeship-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (root, sockets):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    port = free_port()
    subprocess.run(
        _as_postgres(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {sockets} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off"
    subprocess.run(
        _as_postgres(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-w",
                "-t",
                "30",
                "-l",
                str(root / "log"),
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(pg_server: str) -> str:
    """A URL to a new, empty database on the session's server."""
    import psycopg  # noqa: PLC0415 - optional dependency

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    return f"{pg_server}/{name}"
