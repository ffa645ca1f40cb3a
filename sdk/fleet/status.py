"""The fleet at a glance, from the collector's database.

Besides presence, model and telemetry, each device's trust as its reported state says it
(docs/mqtt.md, "state"): the version of the trust root it holds, and why it is held back
if it is. A device is *behind* when it holds an older root than the latest one: the one
the operator names, or else the newest any device of its fleet reports.
"""

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
    root_version: int | None = None  # the trust root it holds (None: not reported)
    root_behind: bool | None = None  # holds an older root than the latest
    held_back: str | None = None  # why it knows updates are withheld, if it does
    unvouched: str | None = None  # why its root no longer vouches for what it serves

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fleet_status(
    store: Store,
    *,
    now: float,
    fleet: str | None = None,
    window_s: float = 900.0,
    latest_root: int | None = None,
) -> list[DeviceStatus]:
    """One row per device, sorted by fleet and device; ``latest_root``: the version of the
    fleet's latest trust root (default: the newest a device of the same fleet reports)."""
    devices = store.query(
        "SELECT fleet, device, status, attributes, current_name, current_version, last_seen,"
        " state FROM devices WHERE CAST(? AS TEXT) IS NULL OR fleet = ? ORDER BY fleet, device",
        [fleet, fleet],
    )
    trust = {(d["fleet"], d["device"]): _trust(d["state"]) for d in devices}
    newest: dict[str, int] = {}
    for (f, _), (version, _, _) in trust.items():
        if version is not None:
            newest[f] = max(version, newest.get(f, version))
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
        root_version, held_back, unvouched = trust[key]
        target = latest_root if latest_root is not None else newest.get(d["fleet"])
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
                root_version=root_version,
                root_behind=None
                if root_version is None or target is None
                else root_version < target,
                held_back=held_back,
                unvouched=unvouched,
            )
        )
    return out


def _trust(state: str | None) -> tuple[int | None, str | None, str | None]:
    """The root version, the held-back reason and the unvouched reason a reported state
    carries (None: absent or not what a device writes: the collector stores what devices
    send, unchecked)."""
    try:
        doc = json.loads(state) if state else None
    except ValueError:
        return None, None, None
    trust = doc.get("trust") if isinstance(doc, dict) else None
    if not isinstance(trust, dict):
        return None, None, None
    version, held, unvouched = (trust.get(k) for k in ("root_version", "held_back", "unvouched"))
    return (
        version if isinstance(version, int) and not isinstance(version, bool) else None,
        held if isinstance(held, str) else None,
        unvouched if isinstance(unvouched, str) else None,
    )
