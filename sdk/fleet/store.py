"""Where the collector keeps the fleet's messages: one interface, SQLite or PostgreSQL.

Tables (the same in both; JSON kept as text so the SQL stays portable):

* ``devices``: one row per device — latest status (online/offline, attributes), latest
  reported state and its current bundle, when anything was last heard from it, and the
  highest ``seq`` stored (for gap detection).
* ``events`` and ``telemetry``: one row per message, key fields as columns, the whole
  payload in ``raw``. ``UNIQUE (fleet, device, seq)`` drops at-least-once duplicates.
* ``gaps``: ranges of ``seq`` not (yet) received. A late message — another collector of
  the shared subscription may have been slower — shrinks or removes its gap.

Every batch is one transaction that locks each device's row first (``BEGIN IMMEDIATE``
in SQLite; ``SELECT ... FOR UPDATE`` in PostgreSQL, in (fleet, device) order so two
collectors cannot deadlock), so several collectors can write to the same database.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.errors import ConfigError

__all__ = [
    "EventRecord",
    "PostgresStore",
    "Record",
    "SqliteStore",
    "StateRecord",
    "StatusRecord",
    "Store",
    "TelemetryRecord",
    "WriteResult",
    "open_store",
]


@dataclass(frozen=True)
class StatusRecord:
    fleet: str
    device: str
    ts: float
    status: str
    attributes: dict[str, Any] | None
    raw: str


@dataclass(frozen=True)
class StateRecord:
    fleet: str
    device: str
    ts: float
    current_digest: str | None
    current_name: str | None
    current_version: str | None
    raw: str


@dataclass(frozen=True)
class EventRecord:
    fleet: str
    device: str
    seq: int
    ts: float
    event: str
    digest: str | None
    reason: str | None
    raw: str


@dataclass(frozen=True)
class TelemetryRecord:
    fleet: str
    device: str
    seq: int
    ts: float
    model_name: str | None
    model_version: str | None
    model_sequence: int | None
    requests: int | None
    error_count: int | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    drift_band: str | None
    psi_max: float | None
    raw: str


Record = StatusRecord | StateRecord | EventRecord | TelemetryRecord


@dataclass
class WriteResult:
    stored: int = 0
    duplicates: int = 0
    gaps: list[tuple[str, str, int, int]] = field(default_factory=list)  # new missing ranges


class Store(Protocol):
    """Storage for the collector and the reports."""

    def write(self, records: Sequence[Record], received_at: float) -> WriteResult:
        """Store a batch in one transaction. Raises: ConfigError when the database fails."""
        ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a read-only query written with ``?`` placeholders; rows as dicts."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
  fleet TEXT NOT NULL, device TEXT NOT NULL,
  status TEXT, status_ts DOUBLE PRECISION, attributes TEXT,
  state TEXT, state_ts DOUBLE PRECISION,
  current_digest TEXT, current_name TEXT, current_version TEXT,
  last_seen DOUBLE PRECISION, max_seq BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (fleet, device));
CREATE TABLE IF NOT EXISTS events (
  fleet TEXT NOT NULL, device TEXT NOT NULL, seq BIGINT NOT NULL,
  ts DOUBLE PRECISION NOT NULL, received_at DOUBLE PRECISION NOT NULL,
  event TEXT NOT NULL, digest TEXT, reason TEXT, raw TEXT NOT NULL,
  UNIQUE (fleet, device, seq));
CREATE TABLE IF NOT EXISTS telemetry (
  fleet TEXT NOT NULL, device TEXT NOT NULL, seq BIGINT NOT NULL,
  ts DOUBLE PRECISION NOT NULL, received_at DOUBLE PRECISION NOT NULL,
  model_name TEXT, model_version TEXT, model_sequence BIGINT,
  requests BIGINT, error_count BIGINT,
  p50_ms DOUBLE PRECISION, p95_ms DOUBLE PRECISION, p99_ms DOUBLE PRECISION,
  drift_band TEXT, psi_max DOUBLE PRECISION, raw TEXT NOT NULL,
  UNIQUE (fleet, device, seq));
CREATE TABLE IF NOT EXISTS gaps (
  fleet TEXT NOT NULL, device TEXT NOT NULL,
  first_seq BIGINT NOT NULL, last_seq BIGINT NOT NULL, detected_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (fleet, device, first_seq));
CREATE INDEX IF NOT EXISTS telemetry_ts ON telemetry (ts);
CREATE INDEX IF NOT EXISTS events_digest ON events (digest)
"""


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Sequence[Any] = ...) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _SqlStore:
    """The logic both databases share; subclasses say how to connect and lock."""

    _lock_suffix = ""

    def _sql(self, sql: str) -> str:
        return sql

    def _transaction(self) -> AbstractContextManager[_Cursor]:
        raise NotImplementedError

    def write(self, records: Sequence[Record], received_at: float) -> WriteResult:
        result = WriteResult()
        # Sorted by device: row locks are always taken in the same order.
        ordered = sorted(records, key=lambda r: (r.fleet, r.device, getattr(r, "seq", 0)))
        with self._transaction() as cur:
            max_seq: dict[tuple[str, str], int] = {}
            for rec in ordered:
                key = (rec.fleet, rec.device)
                if key not in max_seq:
                    max_seq[key] = self._lock_device(cur, rec.fleet, rec.device)
                if isinstance(rec, StatusRecord):
                    self._status(cur, rec)
                elif isinstance(rec, StateRecord):
                    self._state(cur, rec)
                elif self._insert_seq(cur, rec, received_at):
                    result.stored += 1
                    max_seq[key] = self._track_seq(
                        cur,
                        fleet=rec.fleet,
                        device=rec.device,
                        seq=rec.seq,
                        highest=max_seq[key],
                        at=received_at,
                        result=result,
                    )
                    continue
                else:
                    result.duplicates += 1
                    continue
                result.stored += 1
            for (fleet, device), seq in max_seq.items():
                cur.execute(
                    self._sql(
                        "UPDATE devices SET max_seq = ?,"
                        " last_seen = CASE WHEN last_seen IS NULL OR last_seen < ?"
                        " THEN ? ELSE last_seen END WHERE fleet = ? AND device = ?"
                    ),
                    (seq, received_at, received_at, fleet, device),
                )
        return result

    def _lock_device(self, cur: _Cursor, fleet: str, device: str) -> int:
        cur.execute(
            self._sql("INSERT INTO devices (fleet, device) VALUES (?, ?) ON CONFLICT DO NOTHING"),
            (fleet, device),
        )
        cur.execute(
            self._sql("SELECT max_seq FROM devices WHERE fleet = ? AND device = ?")
            + self._lock_suffix,
            (fleet, device),
        )
        return int(cur.fetchone()[0])

    def _status(self, cur: _Cursor, r: StatusRecord) -> None:
        attributes = None if r.attributes is None else json.dumps(r.attributes, sort_keys=True)
        # Latest value wins by the sender's clock; a birth keeps the attributes of the
        # last one when a death (which has none) follows.
        cur.execute(
            self._sql(
                "UPDATE devices SET status = ?, status_ts = ?,"
                " attributes = COALESCE(?, attributes)"
                " WHERE fleet = ? AND device = ? AND (status_ts IS NULL OR status_ts <= ?)"
            ),
            (r.status, r.ts, attributes, r.fleet, r.device, r.ts),
        )

    def _state(self, cur: _Cursor, r: StateRecord) -> None:
        cur.execute(
            self._sql(
                "UPDATE devices SET state = ?, state_ts = ?, current_digest = ?,"
                " current_name = ?, current_version = ?"
                " WHERE fleet = ? AND device = ? AND (state_ts IS NULL OR state_ts <= ?)"
            ),
            (
                r.raw,
                r.ts,
                r.current_digest,
                r.current_name,
                r.current_version,
                r.fleet,
                r.device,
                r.ts,
            ),
        )

    def _insert_seq(self, cur: _Cursor, r: EventRecord | TelemetryRecord, at: float) -> bool:
        if isinstance(r, EventRecord):
            cur.execute(
                self._sql(
                    "INSERT INTO events (fleet, device, seq, ts, received_at, event, digest,"
                    " reason, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
                ),
                (r.fleet, r.device, r.seq, r.ts, at, r.event, r.digest, r.reason, r.raw),
            )
        else:
            cur.execute(
                self._sql(
                    "INSERT INTO telemetry (fleet, device, seq, ts, received_at, model_name,"
                    " model_version, model_sequence, requests, error_count, p50_ms, p95_ms,"
                    " p99_ms, drift_band, psi_max, raw)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING"
                ),
                (
                    r.fleet,
                    r.device,
                    r.seq,
                    r.ts,
                    at,
                    r.model_name,
                    r.model_version,
                    r.model_sequence,
                    r.requests,
                    r.error_count,
                    r.p50_ms,
                    r.p95_ms,
                    r.p99_ms,
                    r.drift_band,
                    r.psi_max,
                    r.raw,
                ),
            )
        return bool(cur.rowcount == 1)

    def _track_seq(
        self,
        cur: _Cursor,
        *,
        fleet: str,
        device: str,
        seq: int,
        highest: int,
        at: float,
        result: WriteResult,
    ) -> int:
        if seq > highest + 1:
            cur.execute(
                self._sql(
                    "INSERT INTO gaps (fleet, device, first_seq, last_seq, detected_at)"
                    " VALUES (?, ?, ?, ?, ?)"
                ),
                (fleet, device, highest + 1, seq - 1, at),
            )
            result.gaps.append((fleet, device, highest + 1, seq - 1))
        if seq > highest:
            return seq
        # A late arrival: it fills part of a recorded gap.
        cur.execute(
            self._sql(
                "SELECT first_seq, last_seq, detected_at FROM gaps WHERE fleet = ? AND device = ?"
                " AND first_seq <= ? AND last_seq >= ?"
            ),
            (fleet, device, seq, seq),
        )
        row = cur.fetchone()
        if row is not None:
            first, last, detected = int(row[0]), int(row[1]), float(row[2])
            cur.execute(
                self._sql("DELETE FROM gaps WHERE fleet = ? AND device = ? AND first_seq = ?"),
                (fleet, device, first),
            )
            for lo, hi in ((first, seq - 1), (seq + 1, last)):
                if lo <= hi:
                    cur.execute(
                        self._sql(
                            "INSERT INTO gaps (fleet, device, first_seq, last_seq, detected_at)"
                            " VALUES (?, ?, ?, ?, ?)"
                        ),
                        (fleet, device, lo, hi, detected),
                    )
        return highest


class SqliteStore(_SqlStore):
    """SQLite in WAL mode: readers never block the collector; one writer at a time.

    Raises (constructor): ConfigError when the file cannot be opened or created.
    """

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a power cut may lose the last commits but never corrupts the
            # file; fsync per batch would cap ingest at the disk's flush rate.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open SQLite database {path}: {e}") from None

    @contextmanager
    def _transaction(self) -> Iterator[_Cursor]:
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


class PostgresStore(_SqlStore):
    """PostgreSQL through psycopg 3 (``pip install 'edgeship[fleet-postgres]'``).

    Raises (constructor): ConfigError when psycopg is missing or the server refuses.
    """

    _lock_suffix = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # noqa: PLC0415 - optional dependency, only for PostgreSQL URLs
        except ImportError:
            raise ConfigError(
                "a postgresql:// database needs psycopg 3: pip install 'psycopg[binary]>=3.1'"
            ) from None
        self._psycopg = psycopg
        try:
            self._db = psycopg.connect(url)
            with self._db.transaction(), self._db.cursor() as cur:
                # One statement per execute: psycopg's extended protocol refuses several.
                for statement in _SCHEMA.split(";"):
                    cur.execute(statement)
        except psycopg.Error as e:
            raise ConfigError(f"cannot open PostgreSQL database: {e}") from None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _transaction(self) -> Iterator[_Cursor]:
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
