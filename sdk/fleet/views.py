"""What the fleet store says about each device and rollout now, as a Prometheus scrape
reads it (:mod:`sdk.fleet.metrics`).

A model's view comes from its device's ``devices`` row (status, last seen), its
``device_models`` row (reported state, running totals) and its latest telemetry message,
found by the ``telemetry_seq`` the collector keeps on that row: one query with a
unique-index lookup per model of a device, whatever the size of the telemetry table.
Fields a device did not report (an older agent, no traffic, no drift reference) are
None, never guessed.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sdk.fleet.store import Store

__all__ = [
    "DRIFT_BANDS",
    "DeviceView",
    "RolloutDevice",
    "RolloutView",
    "Stage",
    "device_views",
    "rollout_views",
]

# The drift bands in order of severity (docs/mqtt.md, "telemetry"): a band's index is the
# value Prometheus gets.
DRIFT_BANDS = ("stable", "moderate", "significant")

_DEVICES_SQL = """
SELECT d.fleet, d.device, d.status, d.last_seen, m.model, m.state, m.current_digest,
  m.current_name, m.current_version, m.requests_total, m.errors_total,
  t.ts AS telemetry_ts, t.p50_ms, t.p95_ms, t.p99_ms, t.drift_band, t.psi_max, t.raw
FROM devices d
LEFT JOIN device_models m ON m.fleet = d.fleet AND m.device = d.device
LEFT JOIN telemetry t ON t.fleet = m.fleet AND t.device = m.device AND t.seq = m.telemetry_seq
WHERE CAST(? AS TEXT) IS NULL OR d.fleet = ?
ORDER BY d.fleet, d.device, m.model
"""


@dataclass(frozen=True)
class Feature:
    """One drift feature of one input and its PSI in the latest window."""

    input: str
    index: int
    psi: float


@dataclass(frozen=True)
class DeviceView:
    """A model of a device now (a device that reported no model yet: ``model`` None).
    Times are Unix seconds; latencies milliseconds, as reported."""

    fleet: str
    device: str
    model: str | None  # agent.toml [models.NAME]
    online: bool | None  # None: no status message seen
    last_seen: float | None
    name: str | None  # the serving bundle
    version: str | None
    sequence: int | None
    digest: str | None
    requests_total: int
    errors_total: int
    telemetry_ts: float | None  # of the latest telemetry message; None: none yet
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    latency_budget_ms: float | None  # the serving bundle's p95 budget, if it has one
    drift_band: str | None
    psi_max: float | None
    top_features: tuple[Feature, ...]  # the highest PSIs of the latest window
    confidence: float | None  # mean top class score of the sampled outputs
    feedback_accuracy: float | None  # telemetry "feedback": {"accuracy": ...}, when reported
    trust_root_version: int | None
    heartbeat_expires: float | None
    held_back: str | None  # why updates are held back (a stale heartbeat, ...), if they are
    stage: Stage | None = None  # a candidate held in shadow or A/B, by the latest telemetry


@dataclass(frozen=True)
class Stage:
    """A candidate between its health gate and serving everyone (telemetry's ``shadow`` or
    ``split``): in shadow, its numbers so far; in A/B, its share of requests."""

    kind: str  # "shadow" or "split"
    digest: str
    samples: int | None = None
    agreement: float | None = None
    latency_ratio: float | None = None
    share: float | None = None


def _obj(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None  # type: ignore[arg-type]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _loads(text: object) -> dict[str, Any]:
    """A stored document (the collector stored it after parsing it), or {}."""
    if not isinstance(text, str) or not text:
        return {}
    try:
        return _obj(json.loads(text))
    except ValueError:
        return {}


def _epoch(text: object) -> float | None:
    """An RFC 3339 time of the state document as Unix seconds; None if absent or odd."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _top_features(drift: dict[str, Any], k: int) -> tuple[Feature, ...]:
    """The ``k`` highest PSIs of the window (64 per input: on every scrape of every
    device, so tuples and a heap, not objects and a sort)."""
    if k <= 0:
        return ()
    found: list[tuple[float, str, int]] = []
    names: dict[str, list[Any]] = {}
    for entry in drift.get("inputs") or []:
        inp = _obj(entry)
        raw_name, psis = inp.get("input"), inp.get("psi")
        name = raw_name if isinstance(raw_name, str) else "?"
        raw_index = inp.get("index")
        names[name] = raw_index if isinstance(raw_index, list) else []
        if isinstance(psis, list):
            found += [
                (-float(v), name, j)
                for j, v in enumerate(psis)
                if type(v) is float or type(v) is int  # not None (too few rows), not bool
            ]
    out = []
    for psi, name, j in heapq.nsmallest(k, found):
        index = names[name]
        feature = _int(index[j]) if j < len(index) else j
        if feature is not None:
            out.append(Feature(name, feature, -psi))
    return tuple(out)


def _stage(telemetry: dict[str, Any]) -> Stage | None:
    shadow, split = _obj(telemetry.get("shadow")), _obj(telemetry.get("split"))
    if isinstance(digest := shadow.get("digest"), str):
        return Stage(
            "shadow",
            digest,
            samples=_int(shadow.get("samples")),
            agreement=_num(shadow.get("agreement")),
            latency_ratio=_num(shadow.get("latency_ratio")),
        )
    if isinstance(digest := split.get("digest"), str):
        return Stage("split", digest, share=_num(split.get("share")))
    return None


def _view(row: dict[str, Any], top_k: int) -> DeviceView:
    state = _loads(row["state"])
    trust = _obj(state.get("trust"))
    telemetry = _loads(row["raw"])
    metrics = _obj(telemetry.get("metrics"))
    model = _obj(metrics.get("model"))
    drift = _obj(telemetry.get("drift"))
    outputs = _obj(drift.get("outputs"))
    held = trust.get("held_back")
    return DeviceView(
        fleet=str(row["fleet"]),
        device=str(row["device"]),
        model=row["model"],
        online=None if row["status"] is None else row["status"] == "online",
        last_seen=_num(row["last_seen"]),
        name=row["current_name"] or _str(model.get("name")),
        version=row["current_version"] or _str(model.get("version")),
        sequence=_int(_obj(state.get("current")).get("sequence")) or _int(model.get("sequence")),
        digest=row["current_digest"],
        requests_total=int(row["requests_total"] or 0),
        errors_total=int(row["errors_total"] or 0),
        telemetry_ts=_num(row["telemetry_ts"]),
        p50_ms=_num(row["p50_ms"]),
        p95_ms=_num(row["p95_ms"]),
        p99_ms=_num(row["p99_ms"]),
        latency_budget_ms=_num(model.get("latency_budget_p95_ms")),
        drift_band=row["drift_band"],
        psi_max=_num(row["psi_max"]),
        top_features=_top_features(drift, top_k),
        confidence=_num(outputs.get("mean")) if outputs.get("kind") == "top_score" else None,
        feedback_accuracy=_num(_obj(telemetry.get("feedback")).get("accuracy")),
        trust_root_version=_int(trust.get("root_version")),
        heartbeat_expires=_epoch(trust.get("heartbeat_expires")),
        held_back=held if isinstance(held, str) else None,
        stage=_stage(telemetry),
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def device_views(store: Store, *, fleet: str | None = None, top_k: int = 3) -> list[DeviceView]:
    """Every model of every device of the store (or of ``fleet``), sorted by fleet, device
    and model, with the ``top_k`` drift features of its latest window.

    Raises:
        StoreError: the query failed (StoreUnavailableError: for now).
    """
    return [_view(row, top_k) for row in store.query(_DEVICES_SQL, [fleet, fleet])]


@dataclass(frozen=True)
class RolloutDevice:
    device: str
    wave: int | None  # None: not published yet
    published_at: float | None
    # succeeded, failed, rejected (the candidate), pending (published, no verdict), waiting
    outcome: str
    reason: str | None


@dataclass(frozen=True)
class RolloutView:
    id: str
    fleet: str
    model: str  # the device-side model it rolls out to
    name: str  # the bundle's name and version
    version: str
    digest: str
    waves: tuple[float, ...]
    status: str
    reason: str | None  # why it halted or was aborted
    created_at: float
    updated_at: float
    devices: tuple[RolloutDevice, ...]  # in wave order

    def count(self, outcome: str) -> int:
        return sum(1 for d in self.devices if d.outcome == outcome)


def rollout_views(
    store: Store, *, fleet: str | None = None, since: float | None = None
) -> list[RolloutView]:
    """The rollouts, oldest first, with each device's outcome: those still running or
    halted, and (with ``since``) only the others updated since then.

    Raises:
        StoreError: the query failed.
    """
    rows = store.query(
        "SELECT id, fleet, model, bundle, plan, status, reason, created_at, updated_at"
        " FROM rollouts WHERE (CAST(? AS TEXT) IS NULL OR fleet = ?)"
        " AND (CAST(? AS DOUBLE PRECISION) IS NULL OR status IN ('running', 'halted')"
        " OR updated_at >= ?) ORDER BY created_at, id",
        [fleet, fleet, since, since],
    )
    if not rows:
        return []
    devices: dict[str, list[RolloutDevice]] = {r["id"]: [] for r in rows}
    placeholders = ", ".join("?" * len(rows))  # only "?"s: the ids are parameters
    sql = (
        "SELECT rollout, device, wave, published_at, outcome, reason FROM rollout_devices"  # noqa: S608
        f" WHERE rollout IN ({placeholders}) ORDER BY rollout, ordinal"
    )
    for d in store.query(sql, [r["id"] for r in rows]):
        published = d["wave"] is not None
        devices[d["rollout"]].append(
            RolloutDevice(
                device=d["device"],
                wave=None if d["wave"] is None else int(d["wave"]),
                published_at=_num(d["published_at"]),
                outcome=str(d["outcome"] or "pending") if published else "waiting",
                reason=d["reason"],
            )
        )
    return [_rollout(r, devices[r["id"]]) for r in rows]


def _rollout(row: dict[str, Any], devices: Sequence[RolloutDevice]) -> RolloutView:
    bundle, plan = _loads(row["bundle"]), _loads(row["plan"])
    waves = tuple(w for w in (_num(x) for x in plan.get("waves") or []) if w is not None)
    return RolloutView(
        id=str(row["id"]),
        fleet=str(row["fleet"]),
        model=str(row["model"]),
        name=str(bundle.get("name", "?")),
        version=str(bundle.get("version", "?")),
        digest=str(bundle.get("digest", "")),
        waves=waves,
        status=str(row["status"]),
        reason=row["reason"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        devices=tuple(devices),
    )
