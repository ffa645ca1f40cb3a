"""The fleet report's figures, as plotly.js figure dictionaries (data and layout).

Built as plain dictionaries (plotly.js reads them in the page), so the report needs only
plotly's JavaScript bundle from the Python package, not its figure classes. Every time
chart has a date axis in UTC with plotly's own ticks, a titled y axis with its unit, and
hover details.
"""

from __future__ import annotations

import statistics
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from sdk.fleet._report_data import ReportData

__all__ = ["Figure", "figures"]

Figure = dict[str, Any]

# Ten colours that stay apart (Tableau 10); a version or feature keeps its colour.
COLORS = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
_EVENT_STYLE = {
    "committed": ("#59a14f", "circle"),
    "rolled-back": ("#f28e2b", "triangle-down"),
    "failed": ("#e15759", "x"),
    "download-failed": ("#b07aa1", "diamond"),
    "desired-refused": ("#9c755f", "square"),
}
# Devices drawn on the timeline; those with a failure or rollback come first.
MAX_TIMELINE_DEVICES = 60


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _layout(
    data: ReportData,
    title: str,
    y_title: str,
    span: tuple[float, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A time chart's layout over ``span`` (default: the whole telemetry's)."""
    assert data.start is not None  # figures() draws nothing without telemetry
    assert data.end is not None
    start, end = span or (data.start, data.end)
    pad = max(data.bucket_s / 2, (end - start) * 0.02)
    return {
        "title": {"text": title, "x": 0, "xanchor": "left"},
        "xaxis": {
            "type": "date",
            "title": {"text": "time (UTC)"},
            "range": [iso(start - pad), iso(end + pad)],
        },
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero", "automargin": True},
        "margin": {"l": 70, "r": 20, "t": 70, "b": 50},
        "height": 340,
        "hovermode": "closest",
        # Above the plot, right: never over the axis' tick labels, whatever the height.
        "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom"},
        "colorway": list(COLORS),
    } | extra


def _line(name: str, points: dict[float, float], hover: str, **extra: Any) -> dict[str, Any]:
    xs = sorted(points)
    return {
        "type": "scatter",
        "mode": "lines+markers",
        "name": name,
        "x": [iso(x) for x in xs],
        "y": [points[x] for x in xs],
        "marker": {"size": 5},
        "hovertemplate": f"%{{x}}<br>{hover}<extra>{name}</extra>",
    } | extra


def latency_figure(data: ReportData) -> Figure:
    traces = [
        _line(label, {b: statistics.median(v) for b, v in buckets.items()}, "p95 %{y:.2f} ms")
        for label, buckets in sorted(data.p95.items())
    ]
    title = f"p95 latency by version (median over devices, {data.bucket_s:g} s buckets)"
    return {"data": traces, "layout": _layout(data, title, "p95 latency (ms)")}


def errors_figure(data: ReportData) -> Figure:
    traces = []
    for label, buckets in sorted(data.traffic.items()):
        rates = {b: 100.0 * e / n for b, (n, e) in buckets.items() if n}
        if rates:
            traces.append(_line(label, rates, "%{y:.2f}% of requests failed"))
    title = f"Error rate by version ({data.bucket_s:g} s buckets)"
    return {"data": traces, "layout": _layout(data, title, "failed requests (%)")}


def drift_figure(data: ReportData) -> Figure:
    traces = [_line(k, v, "PSI %{y:.3f} (max over devices)") for k, v in data.drift.items()]
    if data.psi_max:
        traces.append(
            _line("largest, any feature", data.psi_max, "PSI %{y:.3f}",
                  line={"dash": "dot", "color": "#555"})
        )  # fmt: skip
    bands = [
        {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y,
         "line": {"dash": "dash", "width": 1, "color": color}}
        for y, color in ((0.1, "#edc948"), (0.25, "#e15759"))
    ]  # fmt: skip
    title = (
        f"Drift: the {len(data.drift)} features with the highest PSI"
        " (dashed: 0.1 moderate, 0.25 significant)"
    )
    # PSI needs a window of enough sampled rows: its axis starts with the first one.
    span = (min(data.psi_max), max(data.psi_max)) if data.psi_max else None
    return {"data": traces, "layout": _layout(data, title, "PSI", span, shapes=bands)}


def _timeline_devices(data: ReportData) -> list[str]:
    troubled = Counter(e["device"] for e in data.events if e["event"] != "committed")
    devices = set(data.versions) | {e["device"] for e in data.events}
    return sorted(devices, key=lambda d: (-troubled[d], d))[:MAX_TIMELINE_DEVICES]


def timeline_figure(data: ReportData) -> Figure:
    devices = _timeline_devices(data)
    shown = set(devices)
    labels = sorted({label for d in devices for label in data.versions.get(d, {})})
    traces: list[dict[str, Any]] = []
    for i, label in enumerate(labels):
        xs: list[str | None] = []
        ys: list[str | None] = []
        for d in devices:
            if label in data.versions.get(d, {}):
                first, last = data.versions[d][label]
                xs += [iso(first), iso(last), None]
                ys += [d, d, None]
        traces.append({
            "type": "scatter", "mode": "lines", "name": label, "x": xs, "y": ys,
            "line": {"width": 10, "color": COLORS[i % len(COLORS)]}, "opacity": 0.6,
            "hovertemplate": f"%{{y}}: {label}<br>%{{x}}<extra></extra>",
        })  # fmt: skip
    for kind, (color, symbol) in _EVENT_STYLE.items():
        marks = [e for e in data.events if e["event"] == kind and e["device"] in shown]
        if marks:
            traces.append({
                "type": "scatter", "mode": "markers", "name": kind,
                "x": [iso(float(e["ts"])) for e in marks], "y": [e["device"] for e in marks],
                "marker": {"color": color, "symbol": symbol, "size": 11,
                           "line": {"width": 1, "color": "#222"}},
                "text": [_event_text(e) for e in marks],
                "hovertemplate": "%{y} %{x}<br>%{text}<extra>" + kind + "</extra>",
            })  # fmt: skip
    more = len(set(data.versions) | {e["device"] for e in data.events}) - len(devices)
    title = "Devices: version served (bars) and install outcomes (marks)" + (
        f"; {more} more devices without failures not shown" if more > 0 else ""
    )
    height = 140 + 24 * max(len(devices), 2)
    layout = _layout(data, title, "device", height=height, hovermode="closest")
    layout["yaxis"] = {"type": "category", "automargin": True, "autorange": "reversed"}
    return {"data": traces, "layout": layout}


def _event_text(event: dict[str, Any]) -> str:
    digest = (event["digest"] or "")[:12]
    reason = f"<br>{event['reason']}" if event["reason"] else ""
    return f"bundle {digest or '?'}{reason}"


def versions_figure(data: ReportData) -> Figure:
    now = Counter(max(v.items(), key=lambda kv: kv[1][1])[0] for v in data.versions.values())
    labels = sorted(now)
    trace = {
        "type": "bar",
        "x": labels,
        "y": [now[label] for label in labels],
        "marker": {"color": [COLORS[i % len(COLORS)] for i in range(len(labels))]},
        "hovertemplate": "%{x}: %{y} devices<extra></extra>",
    }
    layout = {
        "title": {"text": "Versions across the fleet (each device's latest telemetry)", "x": 0},
        "xaxis": {"type": "category", "title": {"text": "model version"}},
        "yaxis": {"title": {"text": "devices"}, "rangemode": "tozero", "dtick": 1 if
                  len(data.versions) <= 10 else None},
        "height": 300,
        "margin": {"l": 70, "r": 20, "t": 50, "b": 60},
    }  # fmt: skip
    return {"data": [trace], "layout": layout}


def figures(data: ReportData) -> list[tuple[str, Figure, bool]]:
    """(id, figure, has a time axis), in page order; none without telemetry."""
    if data.start is None:
        return []
    return [
        ("versions", versions_figure(data), False),
        ("timeline", timeline_figure(data), True),
        ("latency", latency_figure(data), True),
        ("errors", errors_figure(data), True),
        ("drift", drift_figure(data), True),
    ]
