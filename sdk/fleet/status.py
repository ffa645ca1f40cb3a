"""The fleet at a glance, from the collector's database."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from sdk.fleet.store import Store

__all__ = ["DeviceStatus", "fleet_status"]


@dataclass(frozen=True)
class DeviceStatus:
    fleet: str
    device: str
    online: bool | None  # None: no status message seen
    model: str | None
    version: str | None
    last_seen: float | None
    p95_ms: float | None  # of the latest telemetry message
    error_rate: float | None  # errors / requests over the window
    drift_band: str | None
    psi_max: float | None
    attributes: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fleet_status(
    store: Store, *, now: float, fleet: str | None = None, window_s: float = 900.0
) -> list[DeviceStatus]:
    """One row per device, sorted by fleet and device."""
    devices = store.query(
        "SELECT fleet, device, status, attributes, current_name, current_version, last_seen"
        " FROM devices WHERE CAST(? AS TEXT) IS NULL OR fleet = ? ORDER BY fleet, device",
        [fleet, fleet],
    )
    errors = {
        (r["fleet"], r["device"]): r
        for r in store.query(
            "SELECT fleet, device, SUM(requests) AS requests, SUM(error_count) AS errors"
            " FROM telemetry WHERE ts >= ? GROUP BY fleet, device",
            [now - window_s],
        )
    }
    latest = {
        (r["fleet"], r["device"]): r
        for r in store.query(
            "SELECT t.fleet, t.device, t.p95_ms, t.drift_band, t.psi_max, t.model_name,"
            " t.model_version FROM telemetry t JOIN (SELECT fleet, device, MAX(seq) AS seq"
            " FROM telemetry GROUP BY fleet, device) m"
            " ON t.fleet = m.fleet AND t.device = m.device AND t.seq = m.seq"
        )
    }
    out = []
    for d in devices:
        key = (d["fleet"], d["device"])
        e, t = errors.get(key, {}), latest.get(key, {})
        requests = e.get("requests")
        out.append(
            DeviceStatus(
                fleet=d["fleet"],
                device=d["device"],
                online=None if d["status"] is None else d["status"] == "online",
                model=d["current_name"] or t.get("model_name"),
                version=d["current_version"] or t.get("model_version"),
                last_seen=d["last_seen"],
                p95_ms=t.get("p95_ms"),
                error_rate=(float(e["errors"] or 0) / float(requests)) if requests else None,
                drift_band=t.get("drift_band"),
                psi_max=t.get("psi_max"),
                attributes=json.loads(d["attributes"]) if d["attributes"] else None,
            )
        )
    return out
