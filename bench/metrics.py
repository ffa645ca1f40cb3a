"""A Prometheus scrape of the fleet store, as JSON.

Fills a fleet store (SQLite on disk, or ``--postgres`` a private PostgreSQL) with
``--devices`` devices, each with a status, a state document (trust root included) and
``--messages`` telemetry messages of the agent's full shape (64 drift features), plus
``--rollouts`` rollouts over the whole fleet; then times, interleaved and ``--runs``
times each:

* ``raw``: the one SQL query a scrape makes for the devices, rows fetched and nothing
  else (the baseline: what reading the store costs at all);
* ``scrape``: a whole scrape, as prometheus-client's HTTP handler does it
  (``generate_latest`` over :class:`sdk.fleet.metrics.FleetCollector`): the devices'
  query, the rollouts', every family built and the text rendered.

``scrape_over_raw`` = median scrape / median raw. Also the exposition's size, its series
in all and per device, and, for scale, what finding each device's latest telemetry by a
``max(seq)`` scan of the telemetry table would take instead of the ``telemetry_seq``
lookup (migration 3).

Usage: python bench/metrics.py [--devices 500] [--messages 100] [--runs 15] [--postgres]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402

from bench._machine import machine  # noqa: E402
from sdk.fleet._rollout_store import RolloutRecords  # noqa: E402
from sdk.fleet.metrics import FleetCollector  # noqa: E402
from sdk.fleet.publish import BundleRef  # noqa: E402
from sdk.fleet.records import StateRecord, StatusRecord, TelemetryRecord  # noqa: E402
from sdk.fleet.rollout import Rollout, RolloutPlan  # noqa: E402
from sdk.fleet.store import Store, open_store  # noqa: E402
from sdk.fleet.views import _DEVICES_SQL  # noqa: E402

NOW = time.time()
_SCAN_SQL = (
    "SELECT t.device, t.p95_ms, t.raw FROM telemetry t JOIN (SELECT fleet, device, max(seq)"
    " AS seq FROM telemetry GROUP BY fleet, device) m"
    " ON t.fleet = m.fleet AND t.device = m.device AND t.seq = m.seq"
)


def _telemetry(device: str, seq: int, ts: float) -> TelemetryRecord:
    psi = [round(0.001 * ((seq * 7 + i) % 97), 4) for i in range(64)]
    raw = {
        "v": 1, "fleet": "f", "device": device, "ts": ts, "seq": seq, "interval_s": 10.0,
        "metrics": {"window_s": 10.0, "requests": 1000, "error_count": 1,
                    "errors": {"invalid-input": 1}, "throughput_rps": 100.0,
                    "latency_ms": {"p50": 0.8, "p95": 1.9, "p99": 3.2, "mean": 0.9, "max": 12.0},
                    "model": {"name": "digits", "version": "1.2.0", "sequence": 7,
                              "latency_budget_p95_ms": 5.0}},
        "drift": {"band": "stable", "inputs": [{"input": "x", "n": 490, "index": list(range(64)),
                  "psi": psi, "psi_max": max(psi), "p": 0.6, "band": "stable"}],
                  "outputs": {"kind": "top_score", "n": 490, "mean": 0.93}},
    }  # fmt: skip
    return TelemetryRecord(
        "f", device, seq, ts, "digits", "1.2.0", 7, 1000, 1, 0.8, 1.9, 3.2, "stable",
        max(psi), json.dumps(raw),
    )  # fmt: skip


def fill(store: Store, devices: int, messages: int, rollouts: int) -> None:
    names = [f"device-{i:04d}" for i in range(devices)]
    for i, name in enumerate(names):
        state = {"current": {"sequence": 7}, "trust": {"root_version": 2 + i % 2}}
        batch: list[Any] = [
            StatusRecord("f", name, NOW - 60, "online", {}, "{}"),
            StateRecord("f", name, NOW - 60, "ab" * 32, "digits", "1.2.0", json.dumps(state)),
        ]
        batch += [
            _telemetry(name, seq, NOW - 10 * (messages - seq)) for seq in range(1, messages + 1)
        ]
        store.write(batch, NOW - 1)
    ref = BundleRef("http://h/b", "a" * 64, "d" * 64, 7, "digits", "1.2.0")
    records = RolloutRecords(store)
    for r in range(rollouts):
        rollout = Rollout(f"r{r}", "f", ref, tuple(names), RolloutPlan((0.1, 1.0), 0.5, 60.0), NOW)
        with records.create(rollout):
            pass


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(store: Store, runs: int) -> dict[str, Any]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(store, clock=lambda: NOW))
    text = generate_latest(registry)
    raw, scrape = [], []
    for _ in range(runs):  # interleaved: load from others on the machine hits both alike
        raw.append(_timed(lambda: store.query(_DEVICES_SQL, [None, None])))
        scrape.append(_timed(lambda: generate_latest(registry)))
    scan = [_timed(lambda: store.query(_SCAN_SQL)) for _ in range(3)]
    per_device = Counter(
        s.labels.get("device")
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    )
    devices = [n for d, n in per_device.items() if d is not None]
    return {
        "raw_query_ms_median": round(statistics.median(raw) * 1e3, 2),
        "scrape_ms_median": round(statistics.median(scrape) * 1e3, 2),
        "scrape_ms_max": round(max(scrape) * 1e3, 2),
        "scrape_over_raw": round(statistics.median(scrape) / statistics.median(raw), 2),
        "latest_by_scan_ms_median": round(statistics.median(scan) * 1e3, 2),
        "exposition_bytes": len(text),
        "series": sum(per_device.values()),
        "series_per_device_max": max(devices, default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--messages", type=int, default=100, help="telemetry messages per device")
    parser.add_argument("--rollouts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--postgres", action="store_true", help="also on a private PostgreSQL")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "devices": args.devices,
        "messages_per_device": args.messages,
        "rollouts": args.rollouts,
        "runs": args.runs,
    }
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-metrics-") as tmp:
        store = open_store(str(Path(tmp) / "fleet.sqlite"))
        try:
            fill(store, args.devices, args.messages, args.rollouts)
            report["sqlite"] = measure(store, args.runs)
        finally:
            store.close()
        if args.postgres:
            from tests.support.postgres import PgServer, create_database  # noqa: PLC0415

            pg = PgServer()
            try:
                pg.start()
                store = open_store(create_database(pg.url))
                try:
                    fill(store, args.devices, args.messages, args.rollouts)
                    report["postgres"] = measure(store, args.runs)
                finally:
                    store.close()
            finally:
                pg.destroy()
    report["machine"] = machine()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
