"""The fleet store's tables and their versioned migrations, the same for SQLite and PostgreSQL.

Tables (JSON kept as text so the SQL stays portable):

* ``devices``: one row per device — latest status (online/offline, attributes), when
  anything was last heard from it, and the highest ``seq`` stored (for gap detection).
* ``device_models``: one row per model of a device — its latest reported state and
  current bundle, the ``seq`` of its latest telemetry and its running totals.
* ``events`` and ``telemetry``: one row per message, key fields (and the model) as
  columns, the whole payload in ``raw``; ``telemetry_versions``: a telemetry message's
  numbers per version of its model. ``UNIQUE (fleet, device, seq)`` drops at-least-once duplicates.
* ``gaps``: ranges of ``seq`` not (yet) received. A late message — another collector of
  the shared subscription may have been slower — shrinks or removes its gap.
* ``rollouts`` and ``rollout_devices``: rollout records beside the telemetry, so any host
  that reaches the database can see and resume a rollout (:mod:`sdk.fleet._rollout_store`).
* ``schema_version``: the migrations applied (:data:`MIGRATIONS`, :func:`apply_migrations`).

Migration 3 gives ``devices`` what a scrape of the fleet's Prometheus metrics reads in
one pass (:mod:`sdk.fleet.metrics`): the ``seq`` of the device's latest telemetry message
(a unique-index lookup instead of a scan of the telemetry table) and running totals of
requests and errors over every telemetry message stored (Prometheus counters).

Migration 4 is several models per device (docs/fleet.md, "Several models"): what is per
model moves to ``device_models``, keyed (fleet, device, model) — reported state, current
bundle, latest telemetry ``seq`` and totals — so two models of one device never overwrite
each other; ``devices`` keeps what is the device's (presence, attributes, last seen,
``max_seq``: one ``seq`` counter per device). ``events``, ``telemetry`` and ``rollouts``
get a ``model`` column (``'default'`` for what was there), ``rollout_devices`` the A/B
``split`` stage of each device, and ``telemetry_versions`` holds each telemetry window's
per-version numbers (requests, errors, latency, feedback), which A/B rollouts compare.

The batch writer is :mod:`sdk.fleet._sql`; :mod:`sdk.fleet.store` applies the migrations
when it opens a store.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.errors import ConfigError
from sdk.fleet._sql import Cursor

__all__ = ["MIGRATIONS", "SCHEMA", "apply_migrations"]


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

# Per model. The old per-device columns of ``devices`` (state .. errors_total) stay,
# unused: SQLite before 3.35 cannot drop a column, and no reader of schema 4 reads them.
_MODELS = """
CREATE TABLE device_models (
  fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL DEFAULT 'default',
  state TEXT, state_ts DOUBLE PRECISION,
  current_digest TEXT, current_name TEXT, current_version TEXT,
  telemetry_seq BIGINT, requests_total BIGINT NOT NULL DEFAULT 0,
  errors_total BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (fleet, device, model));
INSERT INTO device_models (fleet, device, model, state, state_ts, current_digest,
  current_name, current_version, telemetry_seq, requests_total, errors_total)
  SELECT fleet, device, 'default', state, state_ts, current_digest, current_name,
  current_version, telemetry_seq, requests_total, errors_total FROM devices
  WHERE state IS NOT NULL OR telemetry_seq IS NOT NULL;
ALTER TABLE events ADD COLUMN model TEXT NOT NULL DEFAULT 'default';
ALTER TABLE telemetry ADD COLUMN model TEXT NOT NULL DEFAULT 'default';
CREATE TABLE telemetry_versions (
  fleet TEXT NOT NULL, device TEXT NOT NULL, seq BIGINT NOT NULL, model TEXT NOT NULL,
  received_at DOUBLE PRECISION NOT NULL, digest TEXT NOT NULL, role TEXT NOT NULL,
  requests BIGINT, error_count BIGINT,
  p50_ms DOUBLE PRECISION, p95_ms DOUBLE PRECISION, p99_ms DOUBLE PRECISION,
  labels BIGINT, correct BIGINT,
  PRIMARY KEY (fleet, device, seq, digest));
CREATE INDEX telemetry_versions_received ON telemetry_versions (fleet, model, received_at);
ALTER TABLE rollouts ADD COLUMN model TEXT NOT NULL DEFAULT 'default';
ALTER TABLE rollout_devices ADD COLUMN split TEXT
"""

# Each migration is applied once, in order, and recorded in schema_version. Number 1 is
# the collector's first schema, all IF NOT EXISTS: a database made before versioning is
# adopted as it is. Never edit a published migration; add the next one.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "collector tables", SCHEMA),
    (2, "rollout records", _ROLLOUTS),
    (3, "latest telemetry and totals per device", _DEVICE_TOTALS),
    (4, "several models per device, per-version telemetry", _MODELS),
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
