"""The SQL that writes a batch of the collector's records, the same for SQLite and
PostgreSQL (the tables are defined in :mod:`sdk.fleet._migrations`).

:class:`SqlStore` is the batch writer both databases share; :mod:`sdk.fleet.store` says
how each one connects, opens a transaction and locks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeAlias

from sdk.fleet.records import (
    EventRecord,
    Record,
    StateRecord,
    StatusRecord,
    TelemetryRecord,
    VersionRecord,
    WriteResult,
)

__all__ = ["Cursor", "SqlStore"]


_Row: TypeAlias = tuple[Any, ...]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Sequence[Any] = ...) -> Any: ...

    def executemany(self, sql: Any, params_seq: Iterable[Sequence[Any]]) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


_EVENT_COLUMNS = (
    "fleet", "device", "seq", "ts", "received_at", "event", "digest", "reason", "raw", "model",
)  # fmt: skip
_TELEMETRY_COLUMNS = (
    "fleet", "device", "seq", "ts", "received_at", "model_name", "model_version",
    "model_sequence", "requests", "error_count", "p50_ms", "p95_ms", "p99_ms", "drift_band",
    "psi_max", "raw", "model",
)  # fmt: skip
_VERSION_COLUMNS = (
    "fleet", "device", "seq", "model", "received_at", "digest", "role", "requests",
    "error_count", "p50_ms", "p95_ms", "p99_ms", "labels", "correct",
)  # fmt: skip
# Rows per multi-row statement: 17 columns x 500 stays far below both databases' limits on
# bound parameters (SQLite 32,766, PostgreSQL 65,535).
_CHUNK = 500
# Latest value wins by the sender's clock; a birth keeps the attributes of the last one
# when a death (which has none) follows.
_STATUS_SQL = (
    "UPDATE devices SET status = ?, status_ts = ?, attributes = COALESCE(?, attributes)"
    " WHERE fleet = ? AND device = ? AND (status_ts IS NULL OR status_ts <= ?)"
)
_STATE_SQL = (
    "INSERT INTO device_models (fleet, device, model, state, state_ts, current_digest,"
    " current_name, current_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (fleet, device, model) DO UPDATE SET state = excluded.state,"
    " state_ts = excluded.state_ts, current_digest = excluded.current_digest,"
    " current_name = excluded.current_name, current_version = excluded.current_version"
    " WHERE device_models.state_ts IS NULL OR device_models.state_ts <= excluded.state_ts"
)
_GAP_SQL = (
    "INSERT INTO gaps (fleet, device, first_seq, last_seq, detected_at) VALUES (?, ?, ?, ?, ?)"
)
_DEVICE_SQL = (
    "UPDATE devices SET max_seq = ?,"
    " last_seen = CASE WHEN last_seen IS NULL OR last_seen < ? THEN ? ELSE last_seen END"
    " WHERE fleet = ? AND device = ?"
)
_TOTALS_SQL = (
    "INSERT INTO device_models (fleet, device, model, telemetry_seq, requests_total,"
    " errors_total) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device, model) DO UPDATE SET"
    " telemetry_seq = CASE WHEN device_models.telemetry_seq IS NULL"
    " OR device_models.telemetry_seq < excluded.telemetry_seq THEN excluded.telemetry_seq"
    " ELSE device_models.telemetry_seq END,"
    " requests_total = device_models.requests_total + excluded.requests_total,"
    " errors_total = device_models.errors_total + excluded.errors_total"
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
        r.fleet, r.device, r.model, r.raw, r.ts, r.current_digest, r.current_name,
        r.current_version,
    )  # fmt: skip


def _event_row(r: EventRecord, at: float) -> _Row:
    return (r.fleet, r.device, r.seq, r.ts, at, r.event, r.digest, r.reason, r.raw, r.model)


def _telemetry_row(r: TelemetryRecord, at: float) -> _Row:
    return (
        r.fleet, r.device, r.seq, r.ts, at, r.model_name, r.model_version, r.model_sequence,
        r.requests, r.error_count, r.p50_ms, r.p95_ms, r.p99_ms, r.drift_band, r.psi_max, r.raw,
        r.model,
    )  # fmt: skip


def _version_row(r: TelemetryRecord, v: VersionRecord, at: float) -> _Row:
    return (
        r.fleet, r.device, r.seq, r.model, at, v.digest, v.role, v.requests, v.error_count,
        v.p50_ms, v.p95_ms, v.p99_ms, v.labels, v.correct,
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


def _totals(telemetry: Sequence[TelemetryRecord]) -> list[_Row]:
    """Per model of a device, of the telemetry stored (not the duplicates): the highest
    ``seq``, and the requests and errors it counts (rows of :data:`_TOTALS_SQL`)."""
    out: dict[tuple[str, str, str], tuple[int, int, int]] = {}
    for r in telemetry:
        top, requests, errors = out.get((r.fleet, r.device, r.model), (r.seq, 0, 0))
        out[(r.fleet, r.device, r.model)] = (
            max(top, r.seq), requests + (r.requests or 0), errors + (r.error_count or 0),
        )  # fmt: skip
    return [(*key, *values) for key, values in sorted(out.items())]


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
        states.sort(key=lambda r: (r.fleet, r.device, r.model, r.ts))
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
            new = {(str(f), str(d), int(q)) for f, d, q in fresh}
            kept = [r for r in telemetry if (r.fleet, r.device, r.seq) in new]
            self._write_models(cur, kept, received_at)
            cur.executemany(
                self._sql(_DEVICE_SQL),
                [(highest[k], received_at, received_at, *k) for k in keys],
            )
        return result

    def _write_models(
        self, cur: Cursor, telemetry: Sequence[TelemetryRecord], received_at: float
    ) -> None:
        """The per-model side of the stored ``telemetry``: totals, latest seq, versions."""
        if not telemetry:
            return
        cur.executemany(self._sql(_TOTALS_SQL), _totals(telemetry))
        rows = [_version_row(r, v, received_at) for r in telemetry for v in r.versions]
        self._insert_new(cur, "telemetry_versions", _VERSION_COLUMNS, rows)

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
