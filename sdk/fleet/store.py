"""Where the collector keeps the fleet's messages: one interface, SQLite or PostgreSQL.

What is stored is in :mod:`sdk.fleet.records`; the tables in :mod:`sdk.fleet._migrations`,
the batch-writing SQL in :mod:`sdk.fleet._sql`. Every batch is one transaction that
locks each device's row first (``BEGIN IMMEDIATE`` in SQLite; ``SELECT ... FOR UPDATE``
in PostgreSQL, in (fleet, device) order so two collectors cannot deadlock), so several
collectors can write to the same database.

A failed write changes nothing (its transaction is rolled back) and raises one of two
errors: :class:`~sdk.errors.StoreUnavailableError` for what passes (PostgreSQL restarting
or out of reach, a dropped connection, SQLite busy or locked past the busy timeout, a
full disk), after which the next call reconnects first; :class:`~sdk.errors.StoreError`
for what does not (a missing table or column, no permission). The caller decides how
long to wait: the collector waits any outage out.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from agent.errors import ConfigError
from sdk.errors import StoreError, StoreUnavailableError
from sdk.fleet._migrations import apply_migrations
from sdk.fleet._sql import Cursor, SqlStore
from sdk.fleet.records import Record, WriteResult

__all__ = ["PostgresStore", "SqliteStore", "Store", "open_store"]


# Key of the advisory lock that serialises creating the tables (any constant will do;
# this one is "edgeship" in ASCII, truncated to fit a bigint).
_SCHEMA_LOCK = 0x65646765736869


# How long a PostgreSQL (re)connection may take before the attempt counts as failed.
_CONNECT_TIMEOUT_S = 10
# SQLite's primary result codes that pass: BUSY, LOCKED, NOMEM, IOERR, FULL, PROTOCOL.
_SQLITE_PASSING = frozenset({5, 6, 7, 10, 13, 15})
# PostgreSQL error classes that pass: connection exception, transaction rollback
# (serialization, deadlock), insufficient resources, object not in prerequisite state
# (lock not available), operator intervention (shutdown, restart), system error.
_PG_PASSING = frozenset({"08", "40", "53", "55", "57", "58"})


class Store(Protocol):
    """Storage for the collector and the reports.

    ``location`` names the database without secrets (the SQLite file's resolved path, or
    PostgreSQL's host, port and database name): collectors on one store share work.
    """

    location: str

    def write(self, records: Sequence[Record], received_at: float) -> WriteResult:
        """Store a batch in one transaction, or nothing.

        Raises:
            StoreUnavailableError: the database is out of reach or busy for now.
            StoreError: it refused for good (schema, permission).
        """
        ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a read-only query written with ``?`` placeholders; rows as dicts.

        Raises:
            StoreError: as :meth:`write`.
        """
        ...

    def close(self) -> None: ...


def _migrate_sqlite(db: sqlite3.Connection) -> None:
    """Apply the schema migrations under SQLite's write lock: a second process opening the
    file at the same moment waits (busy timeout), then finds them applied.

    Raises:
        ConfigError: the database's schema is newer than this edgeship.
        sqlite3.Error: the lock was not granted in time, or a statement failed.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        apply_migrations(db.cursor(), lambda sql: sql, time.time())
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SqliteStore(SqlStore):
    """SQLite in WAL mode: readers never block the collector; one writer at a time.

    Raises (constructor): ConfigError when the file cannot be opened or created.
    """

    def __init__(
        self, path: Path, *, open_timeout_s: float = 30.0, busy_timeout_s: float = 10.0
    ) -> None:
        deadline = time.monotonic() + open_timeout_s
        self.location = str(path.resolve())
        while True:
            try:
                self._db = self._open(path, busy_timeout_s)
                return  # noqa: TRY300 - the loop retries only the failures
            except sqlite3.OperationalError as e:
                # Two processes opening one *new* file at once: switching it to WAL takes
                # an exclusive lock that SQLite does not wait for (the busy timeout is not
                # consulted there), so the loser fails at once. The winner is done in
                # milliseconds: try again, with jitter, until the deadline.
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise ConfigError(f"cannot open SQLite database {path}: {e}") from None
                time.sleep(random.uniform(0.01, 0.05))  # noqa: S311 - jitter, not crypto
            except sqlite3.Error as e:
                raise ConfigError(f"cannot open SQLite database {path}: {e}") from None

    @staticmethod
    def _open(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout={round(busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on the disk before the collector acknowledges the batch to
            # the broker, power cut or not. One fsync per batch (up to 1,000 messages).
            db.execute("PRAGMA synchronous=FULL")
            _migrate_sqlite(db)
        except BaseException:
            db.close()
            raise
        return db

    @contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        cur = self._db.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            yield cur
            cur.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback()
            raise _sqlite_error(e, "write to", self.location) from None
        except BaseException:
            self._rollback()
            raise
        finally:
            cur.close()

    def _rollback(self) -> None:
        if self._db.in_transaction:
            # A failed ROLLBACK (the disk went away) leaves SQLite to roll back itself.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            cur = self._db.execute(sql, tuple(params))
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        except sqlite3.Error as e:
            raise _sqlite_error(e, "query", self.location) from None

    def close(self) -> None:
        self._db.close()


class PostgresStore(SqlStore):
    """PostgreSQL through psycopg 3 (``pip install 'edgeship[fleet-postgres]'``).

    Raises (constructor): ConfigError when psycopg is missing or the server refuses.
    """

    def __init__(self, url: str, *, open_timeout_s: float = 30.0) -> None:
        try:
            import psycopg  # noqa: PLC0415 - optional dependency, only for PostgreSQL URLs
        except ImportError:
            raise ConfigError(
                "a postgresql:// database needs psycopg 3: pip install 'psycopg[binary]>=3.1'"
            ) from None
        self._psycopg = psycopg
        self._url = url
        try:
            self._db = self._connect()
        except psycopg.Error as e:
            raise ConfigError(f"cannot open PostgreSQL database: {e}") from None
        info = self._db.info
        self.location = f"postgresql://{info.host}:{info.port}/{info.dbname}"
        try:
            self._create_schema(deadline=time.monotonic() + open_timeout_s)
        except psycopg.Error as e:
            self._db.close()
            raise ConfigError(f"cannot create the tables in the PostgreSQL database: {e}") from None
        except ConfigError:
            self._db.close()
            raise

    def _create_schema(self, deadline: float) -> None:
        """Apply the schema migrations, safe against another process doing the same.

        Two sessions creating one table at once both pass the "not exists" check and the
        second fails on a unique index of the catalog (pg_type). A transaction-scoped
        advisory lock serialises the migrations (the second finds them applied); the
        retry covers a process that creates the tables without taking it (an older
        collector).

        Raises:
            psycopg.Error: the server refused, or the race outlasted the deadline.
            ConfigError: the database's schema is newer than this edgeship.
        """
        errors = self._psycopg.errors
        while True:
            try:
                with self._db.transaction(), self._db.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    apply_migrations(cur, self._sql, time.time())
                return  # noqa: TRY300 - the loop retries only the failures
            except (errors.UniqueViolation, errors.DuplicateTable, errors.DuplicateObject):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(random.uniform(0.01, 0.05))  # noqa: S311 - jitter, not crypto

    def _connect(self) -> Any:
        """A new connection (psycopg.Connection). Raises: psycopg.Error."""
        return self._psycopg.connect(self._url, connect_timeout=_CONNECT_TIMEOUT_S)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        with self._connected("write to"), self._db.transaction(), self._db.cursor() as cur:
            yield cur

    @contextmanager
    def _connected(self, what: str) -> Iterator[None]:
        """Reconnect first if the connection was lost; turn psycopg's errors into ours."""
        try:
            if self._db.closed or self._db.broken:
                self._db.close()
                self._db = self._connect()
            yield
        except self._psycopg.Error as e:
            raise self._error(e, what) from None

    def _error(self, e: Exception, what: str) -> StoreError:
        """Whether ``e`` passes: no answer from the server (the network, a lost
        connection), or an answer of a class that passes (shutting down, starting up)."""
        state = getattr(e, "sqlstate", None)
        message = f"cannot {what} PostgreSQL database {self.location}: {e}"
        if (state or "")[:2] in _PG_PASSING or (
            state is None and isinstance(e, self._psycopg.OperationalError)
        ):
            return StoreUnavailableError(f"{message}; the server may be restarting or out of reach")
        return StoreError(f"{message}; fix the database or the --db settings, then restart")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with (
            self._connected("query"),
            self._db.transaction(),
            self._db.cursor() as cur,
        ):
            cur.execute(self._sql(sql), tuple(params))
            names = [d.name for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def close(self) -> None:
        self._db.close()


def _sqlite_error(e: sqlite3.Error, what: str, location: str) -> StoreError:
    code = getattr(e, "sqlite_errorcode", None)
    message = f"cannot {what} SQLite database {location}: {e}"
    if code is not None and code & 0xFF in _SQLITE_PASSING:
        return StoreUnavailableError(f"{message}; another process may hold it, or the disk is full")
    return StoreError(f"{message}; fix the file (schema, permissions), then restart")


def open_store(db: str) -> SqliteStore | PostgresStore:
    """A PostgreSQL store for ``postgresql://`` / ``postgres://`` URLs, else SQLite at that path.

    Raises:
        ConfigError: the database cannot be opened.
    """
    if db.startswith(("postgresql://", "postgres://")):
        return PostgresStore(db)
    return SqliteStore(Path(db))
