"""The collector's tables and the SQL that writes a batch, the same for SQLite and PostgreSQL.

Tables (JSON kept as text so the SQL stays portable):

* ``devices``: one row per device — latest status (online/offline, attributes), latest
  reported state and its current bundle, when anything was last heard from it, and the
  highest ``seq`` stored (for gap detection).
* ``events`` and ``telemetry``: one row per message, key fields as columns, the whole
  payload in ``raw``. ``UNIQUE (fleet, device, seq)`` drops at-least-once duplicates.
* ``gaps``: ranges of ``seq`` not (yet) received. A late message — another collector of
  the shared subscription may have been slower — shrinks or removes its gap.
* ``rollouts`` and ``rollout_devices``: rollout records beside the telemetry, so any host
  that reaches the database can see and resume a rollout (:mod:`sdk.fleet._rollout_store`).
* ``schema_version``: the migrations applied (:data:`MIGRATIONS`, :func:`apply_migrations`).

Migration 3 gives ``devices`` what a scrape of the fleet's Prometheus metrics reads in
one pass (:mod:`sdk.fleet.metrics`): the ``seq`` of the device's latest telemetry message
(a unique-index lookup instead of a scan of the telemetry table) and running totals of
requests and errors over every telemetry message stored (Prometheus counters).

:class:`SqlStore` is the batch writer both databases share; :mod:`sdk.fleet.store` says
how each one connects, opens a transaction and locks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeAlias

from agent.errors import ConfigError
from sdk.fleet.records import (
    EventRecord,
    Record,
    StateRecord,
    StatusRecord,
    TelemetryRecord,
    WriteResult,
)

__all__ = ["MIGRATIONS", "SCHEMA", "Cursor", "SqlStore", "apply_migrations"]


SCHEMA = """
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

# Rollout records (sdk.fleet._rollout_store): one row per rollout with its lease (runner,
# heartbeat), one row per device in wave order.
_ROLLOUTS = """
CREATE TABLE rollouts (
  id TEXT PRIMARY KEY, fleet TEXT NOT NULL, bundle TEXT NOT NULL, plan TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
  status TEXT NOT NULL, wave INTEGER NOT NULL, acked_wave INTEGER NOT NULL,
  revert_state TEXT NOT NULL, reason TEXT, runner_timeout_s DOUBLE PRECISION NOT NULL,
  runner TEXT, runner_since DOUBLE PRECISION, heartbeat_at DOUBLE PRECISION);
CREATE TABLE rollout_devices (
  rollout TEXT NOT NULL, device TEXT NOT NULL, ordinal INTEGER NOT NULL,
  wave INTEGER, published_at DOUBLE PRECISION, previous TEXT,
  outcome TEXT, healthy_since DOUBLE PRECISION, reason TEXT,
  PRIMARY KEY (rollout, device));
CREATE INDEX rollout_devices_order ON rollout_devices (rollout, ordinal);
CREATE INDEX events_received ON events (fleet, received_at)
"""

# The latest telemetry of each device and its running totals (sdk.fleet.metrics reads
# them on every scrape). A database migrated from version 2 counts from the migration on.
_DEVICE_TOTALS = """
ALTER TABLE devices ADD COLUMN telemetry_seq BIGINT;
ALTER TABLE devices ADD COLUMN requests_total BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN errors_total BIGINT NOT NULL DEFAULT 0
"""

# Each migration is applied once, in order, and recorded in schema_version. Number 1 is
# the collector's first schema, all IF NOT EXISTS: a database made before versioning is
# adopted as it is. Never edit a published migration; add the next one.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "collector tables", SCHEMA),
    (2, "rollout records", _ROLLOUTS),
    (3, "latest telemetry and totals per device", _DEVICE_TOTALS),
)
_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)


def apply_migrations(cur: Cursor, sql: Callable[[str], str], now: float) -> list[int]:
    """Apply the migrations the database lacks, in order; returns their numbers.

    Runs in the caller's transaction, which must hold the database's schema lock
    (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock): a second process starting
    at the same moment waits, then finds every migration applied.

    Raises:
        ConfigError: the database has a schema newer than this edgeship knows.
    """
    cur.execute(_VERSION_TABLE)
    cur.execute("SELECT version FROM schema_version")
    done = {int(row[0]) for row in cur.fetchall()}
    latest = MIGRATIONS[-1][0]
    if done and max(done) > latest:
        raise ConfigError(
            f"the database has schema version {max(done)}, newer than this edgeship knows"
            f" ({latest}); upgrade edgeship to use it"
        )
    applied = []
    for version, name, script in MIGRATIONS:
        if version in done:
            continue
        # One statement per execute: psycopg's extended protocol refuses several.
        for statement in script.split(";"):
            if statement.strip():
                cur.execute(statement)
        cur.execute(
            sql("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)"),
            (version, name, now),
        )
        applied.append(version)
    return applied


_Row: TypeAlias = tuple[Any, ...]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Sequence[Any] = ...) -> Any: ...

    def executemany(self, sql: Any, params_seq: Iterable[Sequence[Any]]) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


_EVENT_COLUMNS = ("fleet", "device", "seq", "ts", "received_at", "event", "digest", "reason", "raw")
_TELEMETRY_COLUMNS = (
    "fleet", "device", "seq", "ts", "received_at", "model_name", "model_version",
    "model_sequence", "requests", "error_count", "p50_ms", "p95_ms", "p99_ms", "drift_band",
    "psi_max", "raw",
)  # fmt: skip
# Rows per multi-row statement: 16 columns x 500 stays far below both databases' limits on
# bound parameters (SQLite 32,766, PostgreSQL 65,535).
_CHUNK = 500
# Latest value wins by the sender's clock; a birth keeps the attributes of the last one
# when a death (which has none) follows.
_STATUS_SQL = (
    "UPDATE devices SET status = ?, status_ts = ?, attributes = COALESCE(?, attributes)"
    " WHERE fleet = ? AND device = ? AND (status_ts IS NULL OR status_ts <= ?)"
)
_STATE_SQL = (
    "UPDATE devices SET state = ?, state_ts = ?, current_digest = ?, current_name = ?,"
    " current_version = ?"
    " WHERE fleet = ? AND device = ? AND (state_ts IS NULL OR state_ts <= ?)"
)
_GAP_SQL = (
    "INSERT INTO gaps (fleet, device, first_seq, last_seq, detected_at) VALUES (?, ?, ?, ?, ?)"
)
_DEVICE_SQL = (
    "UPDATE devices SET max_seq = ?,"
    " last_seen = CASE WHEN last_seen IS NULL OR last_seen < ? THEN ? ELSE last_seen END,"
    " telemetry_seq = CASE WHEN telemetry_seq IS NULL OR telemetry_seq < ? THEN ?"
    " ELSE telemetry_seq END,"
    " requests_total = requests_total + ?, errors_total = errors_total + ?"
    " WHERE fleet = ? AND device = ?"
)


def _chunks(rows: Sequence[_Row]) -> Iterator[Sequence[_Row]]:
    for i in range(0, len(rows), _CHUNK):
        yield rows[i : i + _CHUNK]


def _values(n_rows: int, n_columns: int) -> str:
    row = "(" + ", ".join("?" * n_columns) + ")"
    return ", ".join([row] * n_rows)


def _status_row(r: StatusRecord) -> _Row:
    attributes = None if r.attributes is None else json.dumps(r.attributes, sort_keys=True)
    return (r.status, r.ts, attributes, r.fleet, r.device, r.ts)


def _state_row(r: StateRecord) -> _Row:
    return (
        r.raw, r.ts, r.current_digest, r.current_name, r.current_version, r.fleet, r.device, r.ts,
    )  # fmt: skip


def _event_row(r: EventRecord, at: float) -> _Row:
    return (r.fleet, r.device, r.seq, r.ts, at, r.event, r.digest, r.reason, r.raw)


def _telemetry_row(r: TelemetryRecord, at: float) -> _Row:
    return (
        r.fleet, r.device, r.seq, r.ts, at, r.model_name, r.model_version, r.model_sequence,
        r.requests, r.error_count, r.p50_ms, r.p95_ms, r.p99_ms, r.drift_band, r.psi_max, r.raw,
    )  # fmt: skip


def _split(first: int, last: int, filled: Sequence[int]) -> list[tuple[int, int]]:
    """What is left of the gap ``first..last`` once the sorted seqs ``filled`` arrived."""
    left = []
    lo = first
    for seq in filled:
        if first <= seq <= last:
            if lo <= seq - 1:
                left.append((lo, seq - 1))
            lo = max(lo, seq + 1)
    if lo <= last:
        left.append((lo, last))
    return left


# A device without new telemetry in the batch: its telemetry_seq stays, totals add 0.
_NO_TELEMETRY: tuple[int | None, int | None, int, int] = (None, None, 0, 0)


def _totals(
    telemetry: Sequence[TelemetryRecord], stored: set[tuple[str, str, int]]
) -> dict[tuple[str, str], tuple[int | None, int | None, int, int]]:
    """Per device, of the telemetry stored (not the duplicates): the highest ``seq`` (twice,
    for :data:`_DEVICE_SQL`), and the requests and errors it counts."""
    out: dict[tuple[str, str], tuple[int | None, int | None, int, int]] = {}
    for r in telemetry:
        if (r.fleet, r.device, r.seq) not in stored:
            continue
        top, _, requests, errors = out.get((r.fleet, r.device), _NO_TELEMETRY)
        top = r.seq if top is None else max(top, r.seq)
        out[(r.fleet, r.device)] = (
            top, top, requests + (r.requests or 0), errors + (r.error_count or 0),
        )  # fmt: skip
    return out


class SqlStore:
    """The logic both databases share; subclasses say how to connect and lock.

    A batch costs a fixed handful of statements, whatever its size: one multi-row upsert
    that creates and locks the batch's device rows and returns their highest ``seq``, one
    multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` per table (what comes back was
    stored, the rest were duplicates), ``executemany`` for statuses, states, new gaps and
    the devices' ``max_seq`` / ``last_seen``, and a look at the gaps only for a device with
    a late message (one at or below its ``max_seq``).
    """

    def _sql(self, sql: str) -> str:
        return sql

    def _transaction(self) -> AbstractContextManager[Cursor]:
        raise NotImplementedError

    def write(self, records: Sequence[Record], received_at: float) -> WriteResult:
        """Store a batch in one transaction, or nothing.

        Raises:
            StoreUnavailableError: the database is out of reach or busy for now.
            StoreError: it refused for good (schema, permission).
        """
        statuses: list[StatusRecord] = []
        states: list[StateRecord] = []
        events: list[EventRecord] = []
        telemetry: list[TelemetryRecord] = []
        for rec in records:
            if isinstance(rec, TelemetryRecord):
                telemetry.append(rec)
            elif isinstance(rec, EventRecord):
                events.append(rec)
            elif isinstance(rec, StatusRecord):
                statuses.append(rec)
            else:
                states.append(rec)
        # Sorted: device rows are always locked in the same order (no deadlock between
        # collectors), and each device's latest status / state is applied last.
        keys = sorted({(r.fleet, r.device) for r in records})
        statuses.sort(key=lambda r: (r.fleet, r.device, r.ts))
        states.sort(key=lambda r: (r.fleet, r.device, r.ts))
        events.sort(key=lambda r: (r.fleet, r.device, r.seq))
        telemetry.sort(key=lambda r: (r.fleet, r.device, r.seq))
        result = WriteResult()
        if not keys:
            return result
        with self._transaction() as cur:
            highest = self._lock_devices(cur, keys)
            if statuses:
                cur.executemany(self._sql(_STATUS_SQL), [_status_row(r) for r in statuses])
            if states:
                cur.executemany(self._sql(_STATE_SQL), [_state_row(r) for r in states])
            event_rows = [_event_row(r, received_at) for r in events]
            telemetry_rows = [_telemetry_row(r, received_at) for r in telemetry]
            stored = self._insert_new(cur, "events", _EVENT_COLUMNS, event_rows)
            fresh = self._insert_new(cur, "telemetry", _TELEMETRY_COLUMNS, telemetry_rows)
            n_stored = len(stored) + len(fresh)
            result.stored = len(statuses) + len(states) + n_stored
            result.duplicates = len(events) + len(telemetry) - n_stored
            seqs: dict[tuple[str, str], list[int]] = {}
            for fleet, device, seq in (*stored, *fresh):
                seqs.setdefault((str(fleet), str(device)), []).append(int(seq))
            new_gaps = self._gaps(cur, seqs, highest, received_at)
            if new_gaps:
                cur.executemany(self._sql(_GAP_SQL), new_gaps)
                result.gaps.extend((f, d, lo, hi) for f, d, lo, hi, _ in new_gaps)
            totals = _totals(telemetry, {(str(f), str(d), int(q)) for f, d, q in fresh})
            cur.executemany(
                self._sql(_DEVICE_SQL),
                [
                    (highest[k], received_at, received_at, *totals.get(k, _NO_TELEMETRY), *k)
                    for k in keys
                ],
            )
        return result

    def _gaps(
        self,
        cur: Cursor,
        stored: dict[tuple[str, str], list[int]],
        highest: dict[tuple[str, str], int],
        received_at: float,
    ) -> list[tuple[str, str, int, int, float]]:
        """The new missing ranges the ``stored`` seqs reveal (``highest`` moves up with
        them); late seqs heal the recorded gaps they fall in."""
        new_gaps: list[tuple[str, str, int, int, float]] = []
        for key in sorted(stored):
            seqs = sorted(stored[key])
            before = highest[key]
            if seqs[0] <= before:  # late messages: they fill (parts of) recorded gaps
                self._heal_gaps(cur, key, [s for s in seqs if s <= before])
            top = before
            for seq in seqs:
                if seq > top + 1:
                    new_gaps.append((key[0], key[1], top + 1, seq - 1, received_at))
                top = max(top, seq)
            highest[key] = top
        return new_gaps

    def _lock_devices(self, cur: Cursor, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Create the devices' rows if new, lock them (in ``keys`` order), return ``max_seq``.

        The no-op ``DO UPDATE`` is what locks an existing row in PostgreSQL (and makes
        ``RETURNING`` report it); SQLite's ``BEGIN IMMEDIATE`` already holds the file lock.
        """
        highest: dict[tuple[str, str], int] = {}
        for chunk in _chunks(keys):
            cur.execute(
                self._sql(
                    f"INSERT INTO devices (fleet, device) VALUES {_values(len(chunk), 2)}"  # noqa: S608 - placeholders only
                    " ON CONFLICT (fleet, device) DO UPDATE SET max_seq = devices.max_seq"
                    " RETURNING fleet, device, max_seq"
                ),
                [v for key in chunk for v in key],
            )
            for fleet, device, max_seq in cur.fetchall():
                highest[(str(fleet), str(device))] = int(max_seq)
        return highest

    def _insert_new(
        self, cur: Cursor, table: str, columns: Sequence[str], rows: Sequence[_Row]
    ) -> list[tuple[Any, ...]]:
        """Insert ``rows`` but those whose (fleet, device, seq) is there; the stored keys."""
        stored: list[tuple[Any, ...]] = []
        for chunk in _chunks(rows):
            cur.execute(
                self._sql(
                    f"INSERT INTO {table} ({', '.join(columns)})"  # noqa: S608 - constant names
                    f" VALUES {_values(len(chunk), len(columns))}"
                    " ON CONFLICT DO NOTHING RETURNING fleet, device, seq"
                ),
                [v for row in chunk for v in row],
            )
            stored.extend(tuple(row) for row in cur.fetchall())
        return stored

    def _heal_gaps(self, cur: Cursor, key: tuple[str, str], late: list[int]) -> None:
        """Shrink, split or remove the device's recorded gaps that the ``late`` seqs fall in."""
        cur.execute(
            self._sql(
                "SELECT first_seq, last_seq, detected_at FROM gaps WHERE fleet = ? AND device = ?"
                " AND first_seq <= ? AND last_seq >= ?"
            ),
            (key[0], key[1], late[-1], late[0]),
        )
        deleted: list[_Row] = []
        remnants: list[_Row] = []
        for row in cur.fetchall():
            first, last, detected = int(row[0]), int(row[1]), float(row[2])
            inside = [s for s in late if first <= s <= last]
            if not inside:
                continue
            deleted.append((key[0], key[1], first))
            remnants.extend((*key, lo, hi, detected) for lo, hi in _split(first, last, inside))
        if deleted:
            cur.executemany(
                self._sql("DELETE FROM gaps WHERE fleet = ? AND device = ? AND first_seq = ?"),
                deleted,
            )
        if remnants:
            cur.executemany(self._sql(_GAP_SQL), remnants)
