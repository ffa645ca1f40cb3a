"""``edgeship fleet status | report | metrics``: the fleet as the store sees it, and the
``--metrics-*`` options that ``edgeship collect`` shares with ``fleet metrics``.

:func:`register` is called by :mod:`sdk.cli._fleet`, which owns the other fleet commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from agent.bundle.root import load_trust
from agent.errors import ConfigError
from sdk.cli._output import emit
from sdk.fleet.status import DeviceStatus, accuracy_text, fleet_status, stage_text
from sdk.fleet.store import open_store

__all__ = [
    "DEFAULT_DB",
    "accuracy_text",
    "metrics_options",
    "register",
    "stage_text",
    "start_metrics",
]

DEFAULT_DB = "edgeship-fleet.sqlite"
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _ago(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{max(0.0, now - ts):.0f}s ago"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _status(args: argparse.Namespace) -> int:
    latest_root = None if args.root is None else load_trust(args.root).version
    store = open_store(args.db)
    now = time.time()
    try:
        rows = fleet_status(
            store,
            now=now,
            fleet=args.fleet,
            model=args.model,
            window_s=args.window,
            latest_root=latest_root,
        )
    finally:
        store.close()
    table = Table(title=f"fleet ({len(rows)} models of {len({(r.fleet, r.device) for r in rows})}"
                  " devices)")  # fmt: skip
    columns = ("fleet", "device", "model", "online", "serving", "last seen", "p95 ms", "errors")
    for col in (*columns, "drift", "stage", "accuracy", "trust"):
        table.add_column(col)
    for r in rows:
        online = "?" if r.online is None else ("yes" if r.online else "no")
        serving = "-" if r.name is None else f"{r.name} {r.version or ''}".strip()
        drift = "-" if r.drift_band is None else f"{r.drift_band} ({_fmt(r.psi_max, '.3f')})"
        table.add_row(
            r.fleet,
            r.device,
            r.model or "-",
            online,
            serving,
            _ago(r.last_seen, now),
            _fmt(r.p95_ms, ".2f"),
            _fmt(r.error_rate, ".2%"),
            drift,
            stage_text(r),
            accuracy_text(r),
            _trust_cell(r),
        )
    if not rows and not args.json:
        table.caption = (
            f"no devices in {args.db} yet: is `edgeship collect --db {args.db}` running?"
        )
    emit(args, [r.to_json() for r in rows], table)
    return 0


def _trust_cell(r: DeviceStatus) -> str:
    """``v3``; ``v2 BEHIND``; ``held back: <why>``; ``v2 UNVOUCHED: <why>`` (what to look
    at first, first)."""
    if r.held_back is not None:
        return f"held back: {r.held_back}"
    if r.unvouched is not None:
        return f"v{r.root_version} UNVOUCHED: {r.unvouched}"
    if r.root_version is None:
        return "-"
    return f"v{r.root_version}" + (" BEHIND" if r.root_behind else "")


def _report(args: argparse.Namespace) -> int:
    from sdk.fleet.report import render_report  # noqa: PLC0415 - plotly, for a report only

    if args.out is None:
        raise ConfigError("fleet report needs --out FILE.html")
    if args.bucket is not None and args.bucket <= 0:
        raise ConfigError("--bucket must be a positive number of seconds")
    store = open_store(args.db)
    try:
        page = render_report(store, bucket_s=args.bucket, fleet=args.fleet)
    finally:
        store.close()
    try:
        args.out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {args.out}: {e.strerror}") from None
    emit(args, {"out": str(args.out), "bytes": len(page)}, f"wrote {args.out}")
    return 0


def start_metrics(args: argparse.Namespace, *, fleet: str | None) -> Callable[[], None] | None:
    """Serve ``/metrics`` from ``args.db`` when ``--metrics-port`` was given; returns what
    stops it (None: not asked for). The exporter has its own store connection.

    Raises:
        ConfigError: the store cannot be opened or the address bound.
    """
    if args.metrics_port is None:
        return None
    from sdk.fleet.metrics import FleetCollector, MetricsServer  # noqa: PLC0415 - when asked

    store = open_store(args.db)
    try:
        collector = FleetCollector(store, fleet=fleet, top_k=args.drift_top_k)
        server = MetricsServer(collector, args.metrics_host, args.metrics_port)
    except BaseException:
        store.close()
        raise
    if args.metrics_host not in _LOOPBACK:
        print(
            f"warning: fleet metrics are reachable from the network at {server.url}",
            file=sys.stderr,
        )
    if args.json:  # one line a script can read while it serves (collect: on stderr)
        out = sys.stdout if args.command == "fleet" else sys.stderr
        print(json.dumps({"metrics": server.url}), file=out, flush=True)
    else:
        print(f"metrics at {server.url}", flush=True)

    def stop() -> None:
        server.close()
        store.close()

    return stop


def _metrics(args: argparse.Namespace) -> int:
    from sdk.cli._fleet import until_signal  # noqa: PLC0415 - _fleet imports this module

    if args.metrics_port is None:
        args.metrics_port = 9470
    stop_serving = start_metrics(args, fleet=args.fleet)
    assert stop_serving is not None  # a port is set
    try:
        with until_signal() as stop:
            stop.wait(args.duration)
    finally:
        stop_serving()
    return 0


_VIEWS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": _status,
    "report": _report,
    "metrics": _metrics,
}


def cmd_fleet(args: argparse.Namespace) -> int:
    return _VIEWS[args.view](args)


def metrics_options(p: argparse.ArgumentParser, *, default_port: int | None) -> None:
    """``--metrics-host``, ``--metrics-port`` and ``--drift-top-k``."""
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the Prometheus /metrics endpoint (default 127.0.0.1: it names every"
        " device; expose it through a proxy or a firewall you control)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=default_port,
        help="serve Prometheus /metrics on this port (0: any free port)"
        + ("" if default_port is None else f" (default {default_port})"),
    )
    p.add_argument(
        "--drift-top-k",
        type=int,
        default=3,
        metavar="K",
        help="metrics: the K highest-PSI drift features per device (default 3; 0: none)",
    )


def register(command: Callable[[str, Any, str], argparse.ArgumentParser]) -> None:
    """Add ``fleet``; ``command(name, func, help)`` makes one subcommand parser."""
    p = command("fleet", cmd_fleet, "fleet overview from the collector's database")
    p.add_argument(
        "view",
        choices=sorted(_VIEWS),
        help="status: a table of devices; report: a self-contained HTML page (--out);"
        " metrics: serve Prometheus /metrics from the store until stopped",
    )
    p.add_argument("--out", type=Path, help="report: the HTML file to write")
    p.add_argument(
        "--bucket",
        type=float,
        help="report: seconds per chart point (default: sized to the data's time span)",
    )
    p.add_argument(
        "--db", default=DEFAULT_DB, help=f"SQLite path or postgresql:// URL (default {DEFAULT_DB})"
    )
    p.add_argument("--fleet", help="only this fleet")
    p.add_argument("--model", help="status: only this model (agent.toml [models.NAME])")
    p.add_argument(
        "--window",
        type=float,
        default=900.0,
        help="status: error-rate window in seconds (default 900)",
    )
    p.add_argument(
        "--root",
        type=Path,
        help="status: the fleet's latest trust root: devices holding an older one are flagged"
        " BEHIND (default: the newest any device of the fleet reports)",
    )
    metrics_options(p, default_port=None)
    p.add_argument("--duration", type=float, help="metrics: stop after this many seconds")
