"""Rollout records in the fleet store.

The records live beside the telemetry (tables ``rollouts`` and ``rollout_devices``,
migrations 2 and 4 of :mod:`sdk.fleet._migrations`), in SQLite or PostgreSQL: ``status``,
``list`` and ``resume`` work from any host that reaches the database, and the report
shows rollouts.
One runner drives a rollout at a time, holding its lease (:mod:`sdk.fleet._rollout_lease`).
``abort`` takes no lease: it changes the status, which every write of the runner checks,
so the runner stops at its next step.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, cast, get_args

from agent.errors import ConfigError, StateError
from sdk.errors import RolloutError, RunnerBusyError
from sdk.fleet._reported import SIGNAL_EVENTS
from sdk.fleet._rollout_lease import Runner, RunnerInfo, lost_lease, new_holder
from sdk.fleet._sql import Cursor
from sdk.fleet.publish import BundleRef
from sdk.fleet.rollout import (
    DeviceProgress,
    Outcome,
    Revert,
    Rollout,
    RolloutPlan,
    SplitState,
    Status,
)
from sdk.fleet.store import PostgresStore, SqliteStore, Store

__all__ = ["RolloutRecords", "rollout_summaries"]

_ROLLOUT_NAMES = (
    "id", "fleet", "bundle", "plan", "created_at", "status", "wave", "acked_wave",
    "revert_state", "reason", "runner", "runner_since", "heartbeat_at", "runner_timeout_s",
    "model",
)  # fmt: skip
_ROLLOUT_COLUMNS = ", ".join(_ROLLOUT_NAMES)
_DEVICE_COLUMNS = "device, wave, published_at, previous, outcome, healthy_since, reason, split"
# The events a runner reads back (sdk.fleet._reported.SIGNAL_EVENTS).
_SIGNALS = ", ".join(f"'{e}'" for e in SIGNAL_EVENTS)


def _rollout(row: tuple[Any, ...], devices: list[tuple[Any, ...]]) -> Rollout:
    """A rollout from its row and its devices' rows (in wave order).

    Raises:
        ConfigError: the record is not one this version of edgeship wrote.
    """
    status, revert = str(row[5]), str(row[8])
    if status not in get_args(Status) or revert not in get_args(Revert):
        raise ConfigError(f"rollout record {row[0]!r} has status {status!r}, revert {revert!r}")
    try:
        progress = {
            str(d[0]): DeviceProgress(
                device=str(d[0]),
                wave=int(d[1]),
                published_at=float(d[2]),
                previous=d[3],
                outcome=cast(Outcome, str(d[4])),
                healthy_since=None if d[5] is None else float(d[5]),
                reason=d[6],
                split=None if d[7] is None else SplitState.from_json(json.loads(d[7])),
            )
            for d in devices
            if d[1] is not None
        }
        return Rollout(
            id=str(row[0]),
            fleet=str(row[1]),
            bundle=BundleRef.from_json(json.loads(row[2])),
            devices=tuple(str(d[0]) for d in devices),
            plan=RolloutPlan.from_json(json.loads(row[3])),
            created_at=float(row[4]),
            status=cast(Status, status),
            wave=int(row[6]),
            progress=progress,
            reason=row[9],
            acked_wave=int(row[7]),
            revert=cast(Revert, revert),
            model=str(row[14]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"rollout record {row[0]!r} is malformed: {e}") from None


def _info(row: tuple[Any, ...]) -> RunnerInfo:
    return RunnerInfo(
        holder=row[10],
        since=None if row[11] is None else float(row[11]),
        heartbeat_at=None if row[12] is None else float(row[12]),
        timeout_s=float(row[13]),
    )


def _device_row(rollout: str, p: DeviceProgress) -> tuple[Any, ...]:
    split = None if p.split is None else json.dumps(p.split.to_json(), sort_keys=True)
    return (
        p.wave, p.published_at, p.previous, p.outcome, p.healthy_since, p.reason, split, rollout,
        p.device,
    )  # fmt: skip


def rollout_summaries(
    store: Store, fleet: str | None = None, *, now: float | None = None
) -> list[dict[str, Any]]:
    """One dict per rollout, oldest first: id, fleet, model, bundle, status, reason,
    created_at, counts (devices, published, succeeded, failed, rejected) and runner (as
    :class:`RunnerInfo` says, plus ``text``)."""
    rows = store.query(
        f"SELECT {_ROLLOUT_COLUMNS},"  # noqa: S608 - constant
        " (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout = r.id) AS devices,"
        " (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout = r.id"
        "  AND d.wave IS NOT NULL) AS published,"
        " (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout = r.id"
        "  AND d.outcome = 'succeeded') AS succeeded,"
        " (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout = r.id"
        "  AND d.outcome = 'failed') AS failed,"
        " (SELECT COUNT(*) FROM rollout_devices d WHERE d.rollout = r.id"
        "  AND d.outcome = 'rejected') AS rejected"
        " FROM rollouts r WHERE CAST(? AS TEXT) IS NULL OR r.fleet = ?"
        " ORDER BY r.created_at, r.id",
        [fleet, fleet],
    )
    now = time.time() if now is None else now
    out = []
    for r in rows:
        bundle = json.loads(r["bundle"])
        info = _info(tuple(r[k] for k in _ROLLOUT_NAMES))
        out.append(
            {
                "id": r["id"],
                "fleet": r["fleet"],
                "model": r["model"],
                "bundle": f"{bundle['name']} {bundle['version']}",
                "status": r["status"],
                "reason": r["reason"],
                "created_at": r["created_at"],
                "counts": {
                    k: int(r[k])
                    for k in ("devices", "published", "succeeded", "failed", "rejected")
                },
                "runner": info.to_json(now) | {"text": info.describe(now)},
            }
        )
    return out


class RolloutRecords:
    """The rollouts of one fleet store. Thread-safe (a runner heartbeats from a thread).

    Every method raises ``ConfigError`` when the database fails.
    """

    def __init__(
        self, store: SqliteStore | PostgresStore, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()

    @contextmanager
    def _tx(self) -> Iterator[Cursor]:
        # The records share the collector's database, connection and transactions.
        with self._lock, self.store._transaction() as cur:
            yield cur

    def _sql(self, sql: str) -> str:
        return self.store._sql(sql)  # the same placeholders as the collector's

    def _select(self, cur: Cursor, rollout_id: str) -> tuple[Any, ...]:
        cur.execute(
            self._sql(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?"),  # noqa: S608 - constant
            (rollout_id,),
        )
        row = cur.fetchone()
        if row is None:
            raise ConfigError(
                f"no rollout {rollout_id!r} in this database; `edgeship rollout list` shows them"
            )
        return tuple(row)

    def create(self, rollout: Rollout) -> Runner:
        """Record a new rollout, held by this process: use the runner with ``with``.

        Raises:
            ConfigError: a rollout with this id exists, or the database failed.
        """
        holder, now = new_holder(), self.clock()
        with self._tx() as cur:
            cur.execute(self._sql("SELECT 1 FROM rollouts WHERE id = ?"), (rollout.id,))
            if cur.fetchone() is not None:
                raise ConfigError(
                    f"a rollout {rollout.id!r} exists in this database; choose another --id"
                )
            cur.execute(
                self._sql(
                    f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS}, updated_at)"  # noqa: S608 - constant
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                (
                    rollout.id, rollout.fleet, json.dumps(rollout.bundle.to_json()),
                    json.dumps(rollout.plan.to_json()), rollout.created_at, rollout.status,
                    rollout.wave, rollout.acked_wave, rollout.revert, rollout.reason, holder, now,
                    now, rollout.plan.runner_timeout_s, rollout.model, now,
                ),
            )  # fmt: skip
            cur.executemany(
                self._sql(
                    "INSERT INTO rollout_devices (rollout, device, ordinal) VALUES (?, ?, ?)"
                ),
                [(rollout.id, d, i) for i, d in enumerate(rollout.devices)],
            )
            self._write_devices(cur, rollout, replace(rollout, progress={}))
        return Runner(self, rollout, holder)

    def load(self, rollout_id: str) -> tuple[Rollout, RunnerInfo]:
        """The record and its runner, read in one transaction.

        Raises:
            ConfigError: no such rollout, a malformed record, or the database failed.
        """
        with self._tx() as cur:
            row = self._select(cur, rollout_id)
            cur.execute(
                self._sql(
                    f"SELECT {_DEVICE_COLUMNS} FROM rollout_devices"  # noqa: S608 - constant
                    " WHERE rollout = ? ORDER BY ordinal"
                ),
                (rollout_id,),
            )
            devices = [tuple(d) for d in cur.fetchall()]
        return _rollout(row, devices), _info(row)

    def take_over(self, rollout_id: str, *, wait_s: float = 0.0) -> Runner:
        """Hold the rollout, once its runner is gone (waiting up to ``wait_s`` for that).

        Raises:
            RunnerBusyError: its runner is alive (the message names it and when it would
                count as gone).
            ConfigError: no such rollout, or the database failed.
        """
        holder = new_holder()
        deadline = time.monotonic() + wait_s
        while True:
            now = self.clock()
            with self._tx() as cur:
                cur.execute(
                    self._sql(
                        "UPDATE rollouts SET runner = ?, runner_since = ?, heartbeat_at = ?"
                        " WHERE id = ? AND (runner IS NULL OR heartbeat_at < ? - runner_timeout_s)"
                    ),
                    (holder, now, now, rollout_id, now),
                )
                taken = cur.rowcount == 1
            rollout, info = self.load(rollout_id)
            if taken:
                return Runner(self, rollout, holder)
            if time.monotonic() >= deadline:
                age = now - (info.heartbeat_at or now)
                raise RunnerBusyError(
                    f"rollout {rollout_id} is driven by {info.holder} (its last heartbeat"
                    f" {age:.1f}s ago); it counts as gone {info.timeout_s:g}s after its last"
                    " heartbeat: stop that runner, or try again then"
                )
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def abort(self, rollout_id: str, reason: str, *, revert: bool) -> Rollout:
        """Mark the rollout aborted (its runner stops at its next step); with ``revert``,
        record that the devices' previous desired state is to be restored.

        Raises:
            StateError: it completed or was aborted already.
            ConfigError: no such rollout, or the database failed.
        """
        with self._tx() as cur:
            row = self._select(cur, rollout_id)
            if row[5] in ("completed", "aborted"):
                raise StateError(f"rollout {rollout_id} is {row[5]}; there is nothing to abort")
            state = "pending" if revert and row[8] == "none" else row[8]
            cur.execute(
                self._sql(
                    "UPDATE rollouts SET status = 'aborted', reason = ?, revert_state = ?,"
                    " updated_at = ? WHERE id = ? AND status IN ('running', 'halted')"
                ),
                (reason, state, self.clock(), rollout_id),
            )
        return self.load(rollout_id)[0]

    def summaries(self, fleet: str | None = None) -> list[dict[str, Any]]:
        """One dict per rollout, oldest first (see :func:`rollout_summaries`)."""
        with self._lock:
            return rollout_summaries(self.store, fleet, now=self.clock())

    def events_since(self, fleet: str, model: str, since: float) -> list[tuple[str, float, bytes]]:
        """Events of ``model`` a collector stored for ``fleet`` since ``since``: (device,
        received_at, raw).

        A runner that was away reads back what it missed; without a collector there is
        nothing (the retained state still says what it can).
        """
        with self._lock:
            rows = self.store.query(
                "SELECT device, received_at, raw FROM events WHERE fleet = ? AND model = ?"  # noqa: S608 - constants
                f" AND received_at >= ? AND event IN ({_SIGNALS}) ORDER BY received_at, seq",
                [fleet, model, since],
            )
        return [(str(r["device"]), float(r["received_at"]), str(r["raw"]).encode()) for r in rows]

    def versions_since(self, fleet: str, model: str, since: float) -> list[dict[str, Any]]:
        """What each version of ``model`` did per telemetry window a collector stored for
        ``fleet`` since ``since`` (rows of ``telemetry_versions``)."""
        with self._lock:
            return self.store.query(
                "SELECT device, received_at, digest, role, requests, error_count, p95_ms,"
                " labels, correct FROM telemetry_versions"
                " WHERE fleet = ? AND model = ? AND received_at >= ?",
                [fleet, model, since],
            )

    # --- for the runner ----------------------------------------------------------------

    def _write_devices(self, cur: Cursor, rollout: Rollout, before: Rollout) -> None:
        changed = [p for d, p in rollout.progress.items() if before.progress.get(d) != p]
        if changed:
            cur.executemany(
                self._sql(
                    "UPDATE rollout_devices SET wave = ?, published_at = ?, previous = ?,"
                    " outcome = ?, healthy_since = ?, reason = ?, split = ?"
                    " WHERE rollout = ? AND device = ?"
                ),
                [_device_row(rollout.id, p) for p in sorted(changed, key=lambda p: p.device)],
            )

    def write(self, rollout: Rollout, before: Rollout, holder: str) -> bool:
        """Save ``rollout`` (``before``: as last saved) if ``holder`` holds it; False when
        another process changed its status meanwhile (an abort), and nothing is written.

        Raises:
            RolloutError: ``holder`` lost the lease.
        """
        now = self.clock()
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "UPDATE rollouts SET status = ?, wave = ?, acked_wave = ?, revert_state = ?,"
                    " reason = ?, updated_at = ?, heartbeat_at = ?"
                    " WHERE id = ? AND runner = ? AND status IN ('running', ?)"
                ),
                (
                    rollout.status, rollout.wave, rollout.acked_wave, rollout.revert,
                    rollout.reason, now, now, rollout.id, holder, rollout.status,
                ),
            )  # fmt: skip
            if cur.rowcount != 1:
                if self._select(cur, rollout.id)[10] != holder:
                    raise RolloutError(lost_lease(rollout.id))
                return False
            self._write_devices(cur, rollout, before)
        return True

    def heartbeat(self, rollout_id: str, holder: str) -> bool:
        """Refresh the lease; False when ``holder`` no longer holds it."""
        with self._tx() as cur:
            cur.execute(
                self._sql("UPDATE rollouts SET heartbeat_at = ? WHERE id = ? AND runner = ?"),
                (self.clock(), rollout_id, holder),
            )
            return cur.rowcount == 1

    def release(self, rollout_id: str, holder: str) -> None:
        """Let go of the lease; ``heartbeat_at`` then says since when no runner runs."""
        with self._tx() as cur:
            cur.execute(
                self._sql(
                    "UPDATE rollouts SET runner = NULL, heartbeat_at = ?"
                    " WHERE id = ? AND runner = ?"
                ),
                (self.clock(), rollout_id, holder),
            )

    def status_of(self, rollout_id: str) -> str:
        """The rollout's stored status. Raises: ConfigError (no such rollout, database)."""
        with self._tx() as cur:
            return str(self._select(cur, rollout_id)[5])
