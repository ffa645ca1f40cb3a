"""The durable outbox: every telemetry message and event is stored here before it is sent.

One SQLite file in WAL mode. A row is deleted only once the broker acknowledged it
(PUBACK), so broker outages and agent restarts lose nothing that was appended.

Sequence numbers: ``append`` stamps each payload with ``seq``, a per-device counter
kept in the same database and increased in the same transaction as the insert, so it is
monotonic across restarts and a collector sees gaps (drops) and duplicates (re-sends).

Bound and drop policy (the outbox never grows past ``max_bytes``):

1. the oldest *telemetry* rows are dropped first;
2. a new telemetry message that still does not fit (only events left) is itself not
   stored: a lifecycle event is worth more than one interval of metrics;
3. a new event that does not fit even after all telemetry is gone drops the oldest
   *events*: the newest lifecycle events always survive, and the disk stays bounded.

Every drop is counted. The next telemetry message carries the counts since the previous
one and the running totals in its ``dropped`` object, so the loss is reported in-band.

Durability: inserts commit with ``synchronous=FULL`` (the WAL is fsynced before
``append`` returns, so a power cut cannot lose an event the updater was told is stored).
Deletes after acks commit with ``synchronous=NORMAL``: a delete lost to a power cut only
re-sends a message the collector already has and drops by ``seq``; fsyncing every ack
would cap throughput at the disk's fsync rate for no gain.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.messages.topics import encode_json

__all__ = ["DEFAULT_MAX_BYTES", "Kind", "Outbox", "OutboxRecord", "OutboxStats", "encode_json"]

Kind = Literal["telemetry", "event"]
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# Approximate per-row cost in the database beyond topic and payload (row header, index).
_ROW_OVERHEAD_BYTES = 48

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('telemetry', 'event')),
    created REAL NOT NULL,
    expires REAL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind_seq ON outbox (kind, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL);
"""

_COUNTERS = (
    "next_seq",
    "dropped_capacity",
    "dropped_expired",
    "unreported_capacity",
    "unreported_expired",
)


@dataclass(frozen=True)
class OutboxRecord:
    seq: int
    topic: str
    payload: bytes
    qos: int
    kind: Kind
    created: float
    expires: float | None


@dataclass(frozen=True)
class OutboxStats:
    rows: int
    telemetry_rows: int
    event_rows: int
    stored_bytes: int
    max_bytes: int
    next_seq: int
    dropped_capacity: int  # totals since the database was created
    dropped_expired: int


class Outbox:
    """A bounded, durable, thread-safe FIFO of MQTT messages. Create one per device.

    Raises:
        sqlite3.Error: the database cannot be opened or is not an outbox.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < 1024:
            raise ValueError("max_bytes must be at least 1024")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # One connection shared under our lock: the outbox is used by the serving
        # threads (events), the reporter and the paho network thread (acks).
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.executemany(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
            [(k, 1 if k == "next_seq" else 0) for k in _COUNTERS],
        )
        self._bytes = self._stored_bytes()

    # --- writing -------------------------------------------------------------------

    def append(
        self,
        topic: str,
        kind: Kind,
        body: Mapping[str, Any],
        *,
        qos: int = 1,
        ttl_s: float | None = None,
    ) -> int | None:
        """Store one message; returns its ``seq``, or None if a telemetry message had no room.

        The stored payload is ``body`` as JSON plus ``seq`` and, for telemetry, ``dropped``.

        Raises:
            ValueError: unknown kind, a body that is not JSON (NaN included) or that uses
                the reserved keys, or a message larger than the whole outbox.
        """
        if kind not in ("telemetry", "event"):
            raise ValueError(f"kind must be 'telemetry' or 'event', not {kind!r}")
        if "seq" in body or "dropped" in body:
            raise ValueError("'seq' and 'dropped' are set by the outbox")
        now = self._clock()
        expires = None if ttl_s is None else now + ttl_s
        with self._lock:
            self._begin()
            try:
                meta = self._meta()
                seq = meta["next_seq"]
                stamped: dict[str, Any] = {**body, "seq": seq}
                if kind == "telemetry":
                    stamped["dropped"] = {
                        "capacity": meta["unreported_capacity"],
                        "expired": meta["unreported_expired"],
                        "capacity_total": meta["dropped_capacity"],
                        "expired_total": meta["dropped_expired"],
                    }
                try:
                    payload = encode_json(stamped)
                except TypeError as e:
                    raise ValueError(f"message body is not JSON: {e}") from e
                size = len(payload) + len(topic.encode()) + _ROW_OVERHEAD_BYTES
                if size > self.max_bytes:
                    # Raised inside the transaction so that it rolls back.
                    raise ValueError(  # noqa: TRY301
                        f"a {size}-byte message cannot fit a {self.max_bytes}-byte outbox"
                    )
                dropped = self._make_room(size, "telemetry")
                if self._bytes + size > self.max_bytes and kind == "telemetry":
                    # Undo the telemetry deletions too: they did not make room.
                    self._db.execute("ROLLBACK")
                    self._bytes = self._stored_bytes()
                    self._bump_dropped(1)
                    return None
                dropped += self._make_room(size, "event")
                self._db.execute(
                    "INSERT INTO outbox (seq, topic, payload, qos, kind, created, expires, size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, topic, payload, qos, kind, now, expires, size),
                )
                self._bytes += size
                self._set("next_seq", seq + 1)
                if kind == "telemetry":
                    self._set("unreported_capacity", 0)
                    self._set("unreported_expired", 0)
                self._add_dropped(dropped)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._bytes = self._stored_bytes()
                raise
            return seq

    def put_retained(self, topic: str, body: Mapping[str, Any]) -> bytes:
        """Remember the latest retained payload for ``topic`` (sent on every connect).

        Raises:
            ValueError: the body is not JSON.
        """
        try:
            payload = encode_json(body)
        except TypeError as e:
            raise ValueError(f"retained body is not JSON: {e}") from e
        with self._lock:
            self._db.execute(
                "INSERT INTO retained (topic, payload) VALUES (?, ?)"
                " ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload",
                (topic, payload),
            )
        return payload

    def retained(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self._db.execute("SELECT topic, payload FROM retained ORDER BY topic"))

    # --- draining ------------------------------------------------------------------

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[OutboxRecord]:
        """Up to ``limit`` stored messages with ``seq > after_seq``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, kind, created, expires FROM outbox"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [OutboxRecord(*row) for row in rows]

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages; returns how many were still stored."""
        keys = [(s,) for s in seqs]
        if not keys:
            return 0
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._begin()
                before = self._db.total_changes
                freed = 0
                for (seq,) in keys:
                    row = self._db.execute(
                        "DELETE FROM outbox WHERE seq = ? RETURNING size", (seq,)
                    ).fetchone()
                    if row is not None:
                        freed += row[0]
                self._db.execute("COMMIT")
                self._bytes -= freed
                return self._db.total_changes - before
            finally:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._db.execute("PRAGMA synchronous=FULL")

    def expire(self) -> int:
        """Drop messages whose ``ttl_s`` has passed; they count as dropped (expired)."""
        now = self._clock()
        with self._lock:
            self._begin()
            try:
                rows = self._db.execute(
                    "DELETE FROM outbox WHERE expires IS NOT NULL AND expires <= ? RETURNING size",
                    (now,),
                ).fetchall()
                if rows:
                    self._bytes -= sum(r[0] for r in rows)
                    for key in ("dropped_expired", "unreported_expired"):
                        self._set(key, self._meta()[key] + len(rows))
                self._db.execute("COMMIT")
            finally:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
        return len(rows)

    # --- inspection ----------------------------------------------------------------

    def stats(self) -> OutboxStats:
        with self._lock:
            counts = dict(self._db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind"))
            meta = self._meta()
            return OutboxStats(
                rows=sum(counts.values()),
                telemetry_rows=counts.get("telemetry", 0),
                event_rows=counts.get("event", 0),
                stored_bytes=self._bytes,
                max_bytes=self.max_bytes,
                next_seq=meta["next_seq"],
                dropped_capacity=meta["dropped_capacity"],
                dropped_expired=meta["dropped_expired"],
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals (call with the lock held) ----------------------------------------

    def _begin(self) -> None:
        # IMMEDIATE: take the write lock now, so a second process on the same file
        # (an operator's sqlite3 shell) fails fast instead of deadlocking mid-transaction.
        self._db.execute("BEGIN IMMEDIATE")

    def _stored_bytes(self) -> int:
        total: int = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox").fetchone()[0]
        return total

    def _meta(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT key, value FROM meta"))

    def _set(self, key: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _add_dropped(self, count: int) -> None:
        if count:
            meta = self._meta()
            self._set("dropped_capacity", meta["dropped_capacity"] + count)
            self._set("unreported_capacity", meta["unreported_capacity"] + count)

    def _bump_dropped(self, count: int) -> None:
        self._begin()
        self._add_dropped(count)
        self._db.execute("COMMIT")

    def _make_room(self, size: int, kind: Kind) -> int:
        """Delete the oldest rows of ``kind`` until ``size`` more bytes fit; returns the count."""
        dropped = 0
        while self._bytes + size > self.max_bytes:
            row = self._db.execute(
                "DELETE FROM outbox WHERE seq = (SELECT MIN(seq) FROM outbox WHERE kind = ?)"
                " RETURNING size",
                (kind,),
            ).fetchone()
            if row is None:
                break
            self._bytes -= row[0]
            dropped += 1
        return dropped
