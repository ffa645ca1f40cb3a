"""What the fleet report shows, read from the store: series bucketed to the data's span,
each device's versions and events, and the fleet's versions now.

Pure reading and arithmetic; :mod:`sdk.fleet._report_charts` turns it into figures.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from agent.messages.desired import DEFAULT_MODEL
from sdk.fleet.store import Store

__all__ = ["ReportData", "bucket_for", "read_report_data"]

# Bucket sizes a reader recognises, in seconds: from 1 s (a 20-second demo) to a day.
_NICE_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
# About this many points across a chart: enough to see a trend, few enough to hover.
_TARGET_BUCKETS = 120
# Drift features drawn: the highest PSIs of the whole span (not 64 legend entries).
TOP_FEATURES = 5
OUTCOME_EVENTS = ("committed", "rolled-back", "failed", "download-failed", "desired-refused")


def bucket_for(span_s: float) -> float:
    """The smallest nice bucket that keeps a chart of ``span_s`` within ~120 points."""
    for size in _NICE_S:
        if span_s / size <= _TARGET_BUCKETS:
            return float(size)
    return float(_NICE_S[-1])


@dataclass
class Series:
    """Per bucket start (Unix seconds): the values that fell in it."""

    points: dict[float, list[float]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class ReportData:
    bucket_s: float
    start: float | None  # first and last telemetry time; None: no telemetry
    end: float | None
    messages: int
    # version label -> bucket -> device p95s / [requests, errors]
    p95: dict[str, dict[float, list[float]]]
    traffic: dict[str, dict[float, list[int]]]
    # "input[index]" -> bucket -> max PSI over devices; the top features only
    drift: dict[str, dict[float, float]]
    psi_max: dict[float, float]  # bucket -> largest PSI of any feature, any device
    # device -> version label -> (first, last) telemetry time under it
    versions: dict[str, dict[str, tuple[float, float]]]
    events: list[dict[str, Any]]  # outcome events, oldest first


def _label(row: dict[str, Any]) -> str:
    """``digits 1.2.0``, or ``ocr: reader 2.0`` for a model other than ``default``."""
    prefix = "" if row["model"] == DEFAULT_MODEL else f"{row['model']}: "
    if row["model_name"] is None:
        return f"{prefix}no model"
    return f"{prefix}{row['model_name']} {row['model_version']}"


def _features(raw: str) -> list[tuple[str, float]]:
    """(``input[index]``, PSI) of one telemetry message's drift inputs."""
    try:
        drift = json.loads(raw).get("drift") or {}
    except ValueError:  # the collector stored it after parsing: not expected
        return []
    out = []
    for inp in drift.get("inputs") or []:
        index = inp.get("index") or []
        for j, value in enumerate(inp.get("psi") or []):
            if type(value) is float or type(value) is int:
                feature = index[j] if j < len(index) else j
                out.append((f"{inp.get('input', '?')}[{feature}]", float(value)))
    return out


def read_report_data(
    store: Store, *, fleet: str | None = None, bucket_s: float | None = None
) -> ReportData:
    """Everything the charts need, from one pass over the telemetry and the events.

    Raises:
        StoreError: a query failed.
    """
    rows = store.query(
        "SELECT device, ts, model, model_name, model_version, requests, error_count, p95_ms, raw"
        " FROM telemetry WHERE CAST(? AS TEXT) IS NULL OR fleet = ? ORDER BY ts",
        [fleet, fleet],
    )
    start = float(rows[0]["ts"]) if rows else None
    end = float(rows[-1]["ts"]) if rows else None
    size = bucket_s or bucket_for((end or 0.0) - (start or 0.0))
    data = ReportData(size, start, end, len(rows), {}, {}, {}, {}, {}, [])
    p95: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    traffic: dict[str, dict[float, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    drift: dict[str, dict[float, float]] = defaultdict(dict)
    versions: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for r in rows:
        ts = float(r["ts"])
        b = ts - ts % size
        label = _label(r)
        if r["p95_ms"] is not None:
            p95[label][b].append(float(r["p95_ms"]))
        counts = traffic[label][b]
        counts[0] += int(r["requests"] or 0)
        counts[1] += int(r["error_count"] or 0)
        for key, psi in _features(r["raw"]):
            drift[key][b] = max(drift[key].get(b, 0.0), psi)
            data.psi_max[b] = max(data.psi_max.get(b, 0.0), psi)
        first, _ = versions[r["device"]].get(label, (ts, ts))
        versions[r["device"]][label] = (first, ts)
    top = sorted(drift, key=lambda k: (-max(drift[k].values()), k))[:TOP_FEATURES]
    data.p95, data.traffic = dict(p95), dict(traffic)
    data.drift = {k: drift[k] for k in top}
    data.versions = dict(versions)
    marks = ", ".join(f"'{e}'" for e in OUTCOME_EVENTS)
    data.events = store.query(
        "SELECT device, ts, event, digest, reason FROM events"  # noqa: S608 - constants
        f" WHERE event IN ({marks}) AND (CAST(? AS TEXT) IS NULL OR fleet = ?)"
        " ORDER BY ts",
        [fleet, fleet],
    )
    return data
