"""``edgeship fleet report``: one self-contained HTML page about the fleet, for an operator.

Tables: each model of each device now (its serving version, a candidate in shadow or an
A/B split, online accuracy per version), and the rollouts (model, bundle, waves, status,
halt reason, each device's outcome). Charts (plotly.js, embedded in the page, so it
opens offline, from a file or an attachment): versions across the fleet; each device's
versions over time with its install outcomes (failures and rollbacks first); p95 latency
and error rate per version; drift as the few features with the highest PSI. The time
charts share a UTC date axis and a bucket sized to the data's span (``--bucket``
overrides it), so a 20-second demo and a week of a fleet both fill their charts.

plotly.js is about 4.8 MB of the page; what it buys over hand-drawn SVG is a real time
axis (ticks from seconds to weeks), zoom, and hover details, in a library that is kept.
"""

from __future__ import annotations

import html
import json
import time
from datetime import UTC, datetime

from sdk.fleet._report_charts import figures
from sdk.fleet._report_data import read_report_data
from sdk.fleet.status import DeviceStatus, accuracy_text, fleet_status, stage_text
from sdk.fleet.store import Store
from sdk.fleet.views import RolloutView, rollout_views

__all__ = ["render_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } .chart { margin: 1em 0; } .empty { color: #777; }
details summary { cursor: pointer; } .failed { color: #c0392b; } .halted { color: #c0392b; }
"""

# After plotting: what each chart rendered, for tests and for anyone checking the page.
_CHECK = """
const rendered = {};
for (const el of document.querySelectorAll(".chart")) {
  let n = 0, lo = Infinity, hi = -Infinity;
  for (const t of el.data) for (const x of (t.x || [])) {
    if (x === null) continue;
    n += 1;
    const v = el.dataset.time ? Date.parse(x.replace(" ", "T") + "Z") : 0;
    lo = Math.min(lo, v); hi = Math.max(hi, v);
  }
  const r = el._fullLayout.xaxis.range, t = !!el.dataset.time;
  rendered[el.id] = {points: n, traces: el.data.length, time: t, first: lo, last: hi,
    axis: t ? r.map(s => Date.parse(s.replace(" ", "T") + "Z")) : null};
}
document.getElementById("rendered").textContent = JSON.stringify(rendered);
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _row(cells: tuple[object, ...], cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<tr{attr}>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _device_cells(d: DeviceStatus) -> tuple[object, ...]:
    return (
        d.fleet,
        d.device,
        d.model or "-",
        {True: "online", False: "offline", None: "?"}[d.online],
        f"{d.name or '-'} {d.version or ''}".strip(),
        _when(d.last_seen),
        "-" if d.p95_ms is None else f"{d.p95_ms:.2f}",
        "-" if d.error_rate is None else f"{d.error_rate:.2%}",
        "-" if d.drift_band is None else f"{d.drift_band} ({d.psi_max or 0:.3f})",
        stage_text(d),
        accuracy_text(d),
    )


def _devices_table(store: Store, now: float, fleet: str | None) -> str:
    rows = [_row(_device_cells(d)) for d in fleet_status(store, now=now, fleet=fleet)]
    names = (
        "fleet", "device", "model", "status", "serving", "last seen (UTC)", "p95 ms", "errors",
        "drift", "candidate", "online accuracy",
    )  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h in names)
    return f'<table id="devices"><tr>{head}</tr>{"".join(rows)}</table>'


def _rollout_row(r: RolloutView) -> str:
    outcomes = ("succeeded", "failed", "rejected", "pending", "waiting")
    counts = " / ".join(f"{r.count(o)} {o}" for o in outcomes)
    details = "".join(
        _row((d.device, "-" if d.wave is None else d.wave + 1, d.outcome, d.reason or ""),
             "failed" if d.outcome in ("failed", "rejected") else "")
        for d in r.devices
    )  # fmt: skip
    cells = (
        r.id, r.fleet, r.model, f"{r.name} {r.version}", ", ".join(f"{w:.0%}" for w in r.waves),
        r.status, r.reason or "", _when(r.created_at),
    )  # fmt: skip
    per_device = (
        f"<details><summary>{_esc(counts)}</summary><table><tr><th>device</th><th>wave</th>"
        f"<th>outcome</th><th>reason</th></tr>{details}</table></details>"
    )
    cls = ' class="halted"' if r.status == "halted" else ""
    return (
        f"<tr{cls}>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + f"<td>{per_device}</td></tr>"
    )


def _rollouts_table(store: Store, fleet: str | None) -> str:
    rollouts = rollout_views(store, fleet=fleet)
    if not rollouts:
        return '<p class="empty">No rollouts recorded (edgeship rollout).</p>'
    head = "".join(
        f"<th>{h}</th>"
        for h in ("rollout", "fleet", "model", "bundle", "waves", "status", "halt reason",
                  "created (UTC)", "devices")
    )  # fmt: skip
    rows = "".join(_rollout_row(r) for r in reversed(rollouts))  # newest first
    return f'<table id="rollouts"><tr>{head}</tr>{rows}</table>'


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs  # noqa: PLC0415 - 4.8 MB, only for a report

    return str(get_plotlyjs())


def render_report(
    store: Store,
    *,
    bucket_s: float | None = None,
    now: float | None = None,
    fleet: str | None = None,
) -> str:
    """The whole report as an HTML string (of ``fleet``, or every fleet).

    ``bucket_s``: seconds per chart point; by default sized to the data's time span.

    Raises:
        StoreError: a query failed.
    """
    now = time.time() if now is None else now
    data = read_report_data(store, fleet=fleet, bucket_s=bucket_s)
    charts = figures(data)
    divs = "".join(
        f'<div class="chart" id="{name}"' + (' data-time="1"' if timed else "") + "></div>"
        for name, _, timed in charts
    )
    plots = "".join(
        f"Plotly.newPlot({json.dumps(name)}, {json.dumps(fig['data'])},"
        f" {json.dumps(fig['layout'])}, {{responsive: true, displaylogo: false}});\n"
        for name, fig, _ in charts
    )
    span = (
        "no telemetry yet: is `edgeship collect` running?"
        if data.start is None
        else f"telemetry from {_when(data.start)} to {_when(data.end)} UTC,"
        f" {data.messages} messages, {data.bucket_s:g} s per chart point"
    )
    scripts = "" if not charts else (
        f"<script>{_plotly_js()}</script>\n<script>\n{plots}{_CHECK}</script>"
    )  # fmt: skip
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgeship fleet report</title>
<style>{_STYLE}</style></head><body>
<h1>edgeship fleet report{"" if fleet is None else f": {_esc(fleet)}"}</h1>
<p>Generated {_when(now)} UTC; {_esc(span)}.</p>
<h2>Devices</h2>
{_devices_table(store, now, fleet)}
<h2>Rollouts</h2>
{_rollouts_table(store, fleet)}
<h2>Charts</h2>
{divs or '<p class="empty">No charts without telemetry.</p>'}
<pre id="rendered" hidden></pre>
{scripts}
</body></html>
"""
