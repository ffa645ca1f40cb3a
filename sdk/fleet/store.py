"""Where the collector keeps the fleet's messages: one interface, SQLite or PostgreSQL.

What is stored is in :mod:`sdk.fleet.records`; the tables and the batch-writing SQL in
:mod:`sdk.fleet._sql`. Every batch is one
transaction that locks each device's row first (``BEGIN IMMEDIATE`` in SQLite;
``SELECT ... FOR UPDATE`` in PostgreSQL, in (fleet, device) order so two collectors
cannot deadlock), so several collectors can write to the same database.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from agent.errors import ConfigError
from sdk.fleet._sql import SCHEMA, Cursor, SqlStore
from sdk.fleet.records import Record, WriteResult

__all__ = ["PostgresStore", "SqliteStore", "Store", "open_store"]


# Key of the advisory lock that serialises creating the tables (any constant will do;
# this one is "edgeship" in ASCII, truncated to fit a bigint).
_SCHEMA_LOCK = 0x65646765736869


class Store(Protocol):
    """Storage for the collector and the reports."""

    def write(self, records: Sequence[Record], received_at: float) -> WriteResult:
        """Store a batch in one transaction. Raises: ConfigError when the database fails."""
        ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a read-only query written with ``?`` placeholders; rows as dicts."""
        ...

    def close(self) -> None: ...


class SqliteStore(SqlStore):
    """SQLite in WAL mode: readers never block the collector; one writer at a time.

    Raises (constructor): ConfigError when the file cannot be opened or created.
    """

    def __init__(self, path: Path, *, open_timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + open_timeout_s
        while True:
            try:
                self._db = self._open(path)
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
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a power cut may lose the last commits but never corrupts the
            # file; fsync per batch would cap ingest at the disk's flush rate.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
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
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise ConfigError(f"SQLite write failed: {e}") from None
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        finally:
            cur.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self._db.execute(sql, tuple(params))
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

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
        try:
            self._db = psycopg.connect(url)
        except psycopg.Error as e:
            raise ConfigError(f"cannot open PostgreSQL database: {e}") from None
        try:
            self._create_schema(deadline=time.monotonic() + open_timeout_s)
        except psycopg.Error as e:
            self._db.close()
            raise ConfigError(f"cannot create the tables in the PostgreSQL database: {e}") from None

    def _create_schema(self, deadline: float) -> None:
        """``CREATE ... IF NOT EXISTS`` every table, safe against a collector doing the same.

        Two sessions creating one table at once both pass the "not exists" check and the
        second fails on a unique index of the catalog (pg_type). A transaction-scoped
        advisory lock serialises the creation; the retry covers a process that creates
        the tables without taking it (an older collector).

        Raises:
            psycopg.Error: the server refused, or the race outlasted the deadline.
        """
        errors = self._psycopg.errors
        while True:
            try:
                with self._db.transaction(), self._db.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    # One statement per execute: psycopg's extended protocol refuses several.
                    for statement in SCHEMA.split(";"):
                        cur.execute(statement)
                return  # noqa: TRY300 - the loop retries only the failures
            except (errors.UniqueViolation, errors.DuplicateTable, errors.DuplicateObject):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(random.uniform(0.01, 0.05))  # noqa: S311 - jitter, not crypto

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        try:
            with self._db.transaction(), self._db.cursor() as cur:
                yield cur
        except self._psycopg.Error as e:
            raise ConfigError(f"PostgreSQL write failed: {e}") from None

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            with self._db.transaction(), self._db.cursor() as cur:
                cur.execute(self._sql(sql), tuple(params))
                names = [d.name for d in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        except self._psycopg.Error as e:
            raise ConfigError(f"PostgreSQL query failed: {e}") from None

    def close(self) -> None:
        self._db.close()


def open_store(db: str) -> SqliteStore | PostgresStore:
    """A PostgreSQL store for ``postgresql://`` / ``postgres://`` URLs, else SQLite at that path.

    Raises:
        ConfigError: the database cannot be opened.
    """
    if db.startswith(("postgresql://", "postgres://")):
        return PostgresStore(db)
    return SqliteStore(Path(db))
