"""A private PostgreSQL server for tests: initdb + pg_ctl in a temporary directory.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/*/bin``);
psycopg 3 is the client. The server listens on 127.0.0.1 on a free port with ``trust``
authentication and is started once per test session; each test gets a fresh database
(``postgres_url``). Running as root, the server runs as the ``postgres`` user (PostgreSQL
refuses to run as root).

Outage tests get a server of their own (``pg_factory``): :meth:`PgServer.stop` and
:meth:`PgServer.start` restart it on the same port and data directory, so what was
committed before is there after.

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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import free_port

__all__ = [
    "PgServer",
    "create_database",
    "pg_factory",
    "pg_server",
    "postgres_url",
    "require_postgres",
]


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


class PgServer:
    """One PostgreSQL cluster on 127.0.0.1:``port``, restartable (``fsync=off``: tests).

    Raises (constructor, start): RuntimeError without the binaries, or when
    initdb / pg_ctl fail.
    """

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL not found under /usr/lib/postgresql")
        self._bin = bin_dir
        # Not under pytest's tmp: as root that is 0700 and the postgres user cannot enter it.
        self.root = Path(tempfile.mkdtemp(prefix="edgeship-pg-"))
        self._data, self._sockets = self.root / "data", self.root / "sock"
        self._sockets.mkdir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for p in (self.root, self._sockets):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        self._run("initdb", "-D", str(self._data), "-U", "postgres", "-A", "trust", "-E", "UTF8")

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        done = subprocess.run(
            _as_postgres([str(self._bin / tool), *args]), capture_output=True, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.decode(errors='replace')}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self._sockets} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off"
        )
        log = str(self.root / "log")
        self._run(
            "pg_ctl", "-D", str(self._data), "-o", options, "-w", "-t", "30", "-l", log, "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop it: ``fast`` ends every session (what a restart does), ``immediate`` crashes."""
        self._run("pg_ctl", "-D", str(self._data), "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def create_database(base_url: str) -> str:
    """A URL to a new, empty database on the server at ``base_url``."""
    import psycopg  # noqa: PLC0415 - optional dependency

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{base_url}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    return f"{base_url}/{name}"


def require_postgres() -> None:
    """Skip the test without PostgreSQL or psycopg; fail it instead when ``CI=true``."""
    if _bin_dir() is None:
        _missing("PostgreSQL not found under /usr/lib/postgresql (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401, PLC0415 - only to check it is there
    except ImportError:
        _missing("psycopg 3 is not installed (pip install 'psycopg[binary]')")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The base URL (``postgresql://postgres@127.0.0.1:PORT``) of a running server."""
    require_postgres()
    server = PgServer()
    try:
        server.start()
        yield server.url
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(pg_server: str) -> str:
    """A URL to a new, empty database on the session's server."""
    return create_database(pg_server)


@pytest.fixture
def pg_factory() -> Iterator[Callable[[], PgServer]]:
    """Private, running servers for tests that stop and start them; destroyed at teardown."""
    require_postgres()
    made: list[PgServer] = []

    def make() -> PgServer:
        server = PgServer()
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.destroy()
