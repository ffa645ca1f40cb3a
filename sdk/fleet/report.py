"""``edgeship fleet report``: one self-contained HTML page with inline SVG charts.

No JavaScript and no external files: the page opens anywhere, from a file or an email
attachment. Tables: the devices, and the rollouts recorded in the store (status, counts,
runner). Charts: latency percentiles per model version over time, error rate per
version, drift (PSI) per input feature, and rollout progress (devices that committed or
failed each bundle, cumulative).
"""

from __future__ import annotations

import html
import json
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sdk.fleet._rollout_store import rollout_summaries
from sdk.fleet.status import fleet_status
from sdk.fleet.store import Store

__all__ = ["line_chart", "render_report"]

Series = Mapping[str, Sequence[tuple[float, float]]]
Points = list[tuple[float, float]]

_W, _H, _PAD = 800, 240, 44
_LEGEND = 180  # room on the right for series names
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def _fmt_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def line_chart(title: str, series: Series, *, unit: str = "") -> str:
    """An inline SVG line chart; x is a Unix time, one polyline per series."""
    points = [p for s in series.values() for p in s]
    esc = html.escape
    if not points:
        return f'<figure><figcaption>{esc(title)}</figcaption><p class="empty">no data</p></figure>'
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y1 = max(p[1] for p in points) or 1.0
    x1 = x1 if x1 > x0 else x0 + 1

    def sx(x: float) -> float:
        return _PAD + (x - x0) / (x1 - x0) * (_W - 2 * _PAD - _LEGEND)

    def sy(y: float) -> float:
        return _H - _PAD - y / y1 * (_H - 2 * _PAD)

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}"'
        f' width="{_W}" height="{_H}" role="img" aria-label="{esc(title)}">',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD - _LEGEND}" y2="{_H - _PAD}"'
        ' stroke="#888"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#888"/>',
        f'<text x="{_PAD - 4}" y="{_PAD}" text-anchor="end" font-size="10">{y1:.3g}{unit}</text>',
        f'<text x="{_PAD - 4}" y="{_H - _PAD}" text-anchor="end" font-size="10">0</text>',
        f'<text x="{_PAD}" y="{_H - _PAD + 14}" font-size="10">{_fmt_ts(x0)}</text>',
        f'<text x="{_W - _PAD - _LEGEND}" y="{_H - _PAD + 14}" text-anchor="end" font-size="10">'
        f"{_fmt_ts(x1)}</text>",
    ]
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
        parts.append(
            f'<polyline class="series" data-series="{esc(name)}" fill="none" stroke="{color}"'
            f' stroke-width="1.5" points="{coords}"/>'
        )
        for x, y in sorted(pts):
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{color}"/>')
        parts.append(
            f'<text x="{_W - _LEGEND}" y="{_PAD + 12 * i}" font-size="10" fill="{color}">'
            f"{esc(name)}</text>"
        )
    parts.append("</svg>")
    return f"<figure><figcaption>{esc(title)}</figcaption>{''.join(parts)}</figure>"


def _bucket(ts: float, size_s: float) -> float:
    return ts - ts % size_s


def _telemetry_series(
    rows: list[dict[str, Any]], bucket_s: float
) -> tuple[dict[str, Points], dict[str, Points], dict[str, Points]]:
    """Latency percentiles and error rate per model version, and PSI per input feature."""
    lat: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    req: dict[str, dict[float, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    psi: dict[str, dict[float, float]] = defaultdict(dict)
    for r in rows:
        b = _bucket(float(r["ts"]), bucket_s)
        version = (
            f"{r['model_name']} {r['model_version']}"
            if r["model_name"] is not None
            else "no model installed"
        )
        for q in ("p50", "p95", "p99"):
            if r[f"{q}_ms"] is not None:
                lat[f"{version} {q}"][b].append(float(r[f"{q}_ms"]))
        counts = req[version][b]
        counts[0] += int(r["requests"] or 0)
        counts[1] += int(r["error_count"] or 0)
        drift = json.loads(r["raw"]).get("drift") or {}
        for inp in drift.get("inputs") or []:
            index = inp.get("index") or []
            for j, value in enumerate(inp.get("psi") or []):
                if isinstance(value, int | float):
                    key = f"{inp.get('input', '?')}[{index[j] if j < len(index) else j}]"
                    psi[key][b] = max(psi[key].get(b, 0.0), float(value))
    latency = {k: [(b, sum(v) / len(v)) for b, v in s.items()] for k, s in lat.items()}
    errors = {k: [(b, e / n) for b, (n, e) in s.items() if n] for k, s in req.items()}
    return latency, errors, {k: list(s.items()) for k, s in psi.items()}


def _progress(events: list[dict[str, Any]]) -> dict[str, Points]:
    """Devices that committed or failed each bundle digest, cumulative over time."""
    progress: dict[str, Points] = defaultdict(list)
    totals: dict[str, int] = defaultdict(int)
    for e in events:
        key = f"{str(e['digest'])[:12]} {'committed' if e['event'] == 'committed' else 'failed'}"
        totals[key] += 1
        progress[key].append((float(e["ts"]), float(totals[key])))
    return progress


def _device_rows(store: Store, now: float) -> str:
    return "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                d.fleet,
                d.device,
                {True: "online", False: "offline", None: "?"}[d.online],
                f"{d.model or '-'} {d.version or ''}",
                "-" if d.p95_ms is None else f"{d.p95_ms:.2f}",
                "-" if d.error_rate is None else f"{d.error_rate:.2%}",
                d.drift_band or "-",
            )
        )
        + "</tr>"
        for d in fleet_status(store, now=now)
    )


def _rollout_rows(store: Store, now: float) -> str:
    rows = []
    for r in rollout_summaries(store, now=now):
        c = r["counts"]
        status = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
        cells = (
            r["id"], r["fleet"], r["bundle"], status, f"{c['published']}/{c['devices']}",
            c["succeeded"], c["failed"], r["runner"]["text"],
        )  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + "</tr>")
    return "".join(rows)


def render_report(store: Store, *, bucket_s: float = 60.0, now: float | None = None) -> str:
    """The whole report as an HTML string."""
    now = time.time() if now is None else now
    rows = store.query(
        "SELECT ts, model_name, model_version, requests, error_count, p50_ms, p95_ms, p99_ms,"
        " raw FROM telemetry ORDER BY ts"
    )
    latency, errors, drift = _telemetry_series(rows, bucket_s)
    events = store.query(
        "SELECT ts, event, digest FROM events WHERE event IN ('committed', 'rolled-back',"
        " 'failed') AND digest IS NOT NULL ORDER BY ts"
    )
    charts = [
        line_chart("Latency percentiles per version (mean over devices)", latency, unit=" ms"),
        line_chart("Error rate per version", errors),
        line_chart("Drift: PSI per input feature (max over devices)", drift),
        line_chart("Rollout progress: devices per bundle digest (cumulative)", _progress(events)),
    ]
    generated = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgeship fleet report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
figure {{ margin: 1.5em 0; }} figcaption {{ font-weight: 600; margin-bottom: .3em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .2em .6em; }}
.empty {{ color: #888; }}
</style></head><body>
<h1>edgeship fleet report</h1>
<p>Generated {generated} from {len(rows)} telemetry messages and {len(events)} outcome events.</p>
<h2>Devices</h2>
<table id="devices"><tr><th>fleet</th><th>device</th><th>status</th><th>model</th>
<th>p95 ms</th><th>errors</th><th>drift</th></tr>{_device_rows(store, now)}</table>
<h2>Rollouts</h2>
<table id="rollouts"><tr><th>rollout</th><th>fleet</th><th>bundle</th><th>status</th>
<th>published</th><th>succeeded</th><th>failed</th><th>runner</th></tr>
{_rollout_rows(store, now)}</table>
<h2>Charts</h2>
{"".join(charts)}
</body></html>
"""
