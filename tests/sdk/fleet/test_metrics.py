"""The fleet's /metrics: what a scrape reads from the store, and its bounds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from sdk.cli import main
from sdk.fleet._rollout_store import RolloutRecords
from sdk.fleet.metrics import DEVICE_SERIES, MODEL_SERIES, FleetCollector, MetricsServer
from sdk.fleet.publish import BundleRef
from sdk.fleet.records import StateRecord, StatusRecord, TelemetryRecord
from sdk.fleet.rollout import DeviceProgress, Rollout, RolloutPlan
from sdk.fleet.store import SqliteStore, open_store
from tests.support.postgres import PgServer, create_database

NOW = 1_800_000_000.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def telemetry(
    device: str,
    seq: int,
    *,
    ts: float = NOW - 5,
    requests: int = 100,
    stage: dict[str, Any] | None = None,
) -> TelemetryRecord:
    psi = [0.01 * i for i in range(64)]
    raw = {
        "metrics": {"model": {"name": "digits", "version": "1.2.0", "sequence": 7,
                              "latency_budget_p95_ms": 5.0}},
        "drift": {"inputs": [{"input": "x", "index": list(range(64)), "psi": psi}],
                  "outputs": {"kind": "top_score", "mean": 0.93}},
        **(stage or {}),
    }  # fmt: skip
    return TelemetryRecord(
        "f", device, seq, ts, "digits", "1.2.0", 7, requests, 2, 1.0, 2.0, 3.0,
        "moderate", 0.63, json.dumps(raw),
    )  # fmt: skip


def state(device: str, trust: dict[str, Any] | None) -> StateRecord:
    doc: dict[str, Any] = {"current": {"sequence": 7}}
    if trust is not None:
        doc["trust"] = trust
    return StateRecord("f", device, NOW - 5, "ab" * 32, "digits", "1.2.0", json.dumps(doc))


def scrape(collector: FleetCollector) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def dev(metric: str, device: str = "d1", **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return metric, tuple(sorted({"fleet": "f", "device": device, **labels}.items()))


def mod(metric: str, device: str = "d1", **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A per-model series (of model ``default`` unless ``model`` says otherwise)."""
    return dev(metric, device, **{"model": "default", **labels})


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "fleet.sqlite")
    s.write(
        [
            StatusRecord("f", "d1", NOW - 30, "online", {}, "{}"),
            state("d1", {"root_version": 3, "heartbeat_expires": "2027-01-15T08:00:00Z"}),
            telemetry("d1", 1),
            telemetry("d1", 2),
            StatusRecord("f", "d2", NOW - 900, "offline", {}, "{}"),
            state("d2", None),
            telemetry("d2", 1, ts=NOW - 3600),
        ],
        NOW - 2,
    )
    return s


def test_a_scrape_reads_each_devices_latest_telemetry_and_state(store: SqliteStore) -> None:
    got = scrape(FleetCollector(store, clock=lambda: NOW))
    assert got[dev("edgeship_device_online")] == 1
    assert got[dev("edgeship_device_online", "d2")] == 0
    assert got[dev("edgeship_device_last_seen_age_seconds")] == 2
    assert got[mod("edgeship_device_requests_total")] == 200
    assert got[mod("edgeship_device_errors_total")] == 4
    assert got[mod("edgeship_device_latency_seconds", quantile="0.95")] == 0.002
    assert got[mod("edgeship_device_latency_budget_seconds")] == 0.005
    assert got[mod("edgeship_device_drift_psi_max")] == 0.63
    assert got[mod("edgeship_device_drift_band")] == 1
    assert got[mod("edgeship_device_confidence")] == 0.93
    assert got[dev("edgeship_device_trust_root_version")] == 3
    info = mod("edgeship_device_version_info", name="digits", version="1.2.0", sequence="7",
               digest="ab" * 32)  # fmt: skip
    assert got[info] == 1


def test_duplicate_telemetry_is_not_counted_twice(store: SqliteStore) -> None:
    store.write([telemetry("d1", 2)], NOW - 1)
    got = scrape(FleetCollector(store, clock=lambda: NOW))
    assert got[mod("edgeship_device_requests_total")] == 200


def test_a_device_without_trust_or_fresh_telemetry_exports_only_presence(
    store: SqliteStore,
) -> None:
    got = scrape(FleetCollector(store, clock=lambda: NOW))
    d2 = {name for name, labels in got if ("device", "d2") in labels}
    assert d2 == {
        "edgeship_device_online", "edgeship_device_last_seen_age_seconds",
        "edgeship_device_version_info", "edgeship_device_requests_total",
        "edgeship_device_errors_total",
    }  # fmt: skip


SHADOW = {
    "shadow": {"digest": "cd" * 32, "samples": 150, "agreed": 149, "agreement": 149 / 150,
               "latency_ratio": 1.1, "errors": 0, "accuracy": None, "verdict": "watching"},
}  # fmt: skip


def test_a_candidate_in_shadow_is_exported_with_its_numbers_until_it_leaves_it(
    store: SqliteStore,
) -> None:
    store.write([telemetry("d1", 3, ts=NOW - 4, stage=SHADOW)], NOW - 1)
    got = scrape(FleetCollector(store, clock=lambda: NOW))
    assert got[mod("edgeship_device_stage_info", stage="shadow", digest="cd" * 32)] == 1
    assert got[mod("edgeship_device_shadow_samples")] == 150
    assert got[mod("edgeship_device_shadow_agreement")] == 149 / 150
    assert got[mod("edgeship_device_shadow_latency_ratio")] == 1.1
    assert mod("edgeship_device_split_share") not in got
    # Promoted: the next telemetry has no shadow, and neither has the scrape.
    store.write([telemetry("d1", 4, ts=NOW - 3)], NOW - 1)
    got = scrape(FleetCollector(store, clock=lambda: NOW))
    assert not [name for name, _ in got if "stage" in name or "shadow" in name]


def test_an_ab_candidate_is_exported_with_its_share(store: SqliteStore) -> None:
    split = {"split": {"digest": "ef" * 32, "share": 0.2}}
    store.write([telemetry("d1", 3, ts=NOW - 4, stage=split)], NOW - 1)
    got = scrape(FleetCollector(store, clock=lambda: NOW))
    assert got[mod("edgeship_device_stage_info", stage="split", digest="ef" * 32)] == 1
    assert got[mod("edgeship_device_split_share")] == 0.2
    assert mod("edgeship_device_shadow_samples") not in got


def test_series_per_device_stay_within_the_documented_bound(store: SqliteStore) -> None:
    store.write([telemetry("d1", 3, ts=NOW - 4, stage=SHADOW)], NOW - 1)  # the most series
    got = scrape(FleetCollector(store, top_k=3, clock=lambda: NOW))
    per_device = Counter(dict(labels).get("device") for _, labels in got)
    assert per_device["d1"] <= DEVICE_SERIES + MODEL_SERIES + 3
    top = sorted(
        (float(dict(labels)["feature"]), v)
        for (name, labels), v in got.items()
        if name == "edgeship_device_drift_feature_psi"
    )
    assert top == [(61.0, 0.61), (62.0, 0.62), (63.0, 0.63)]


def test_rollouts_are_exported_with_their_status_and_outcomes(store: SqliteStore) -> None:
    ref = BundleRef("http://h/b", "a" * 64, "d" * 64, 7, "digits", "1.2.0")
    rollout = Rollout("r1", "f", ref, ("d1", "d2"), RolloutPlan((1.0,), 0.5, 0.0), created_at=NOW)
    with RolloutRecords(store, clock=lambda: NOW).create(rollout) as runner:
        failed = {"d1": DeviceProgress("d1", 0, NOW, outcome="failed", reason="health")}
        runner.save(replace(rollout, wave=0, progress=failed, status="halted", reason="1 failed"))
    got = scrape(FleetCollector(store, clock=lambda: NOW))
    status = ("edgeship_rollout_status", (("fleet", "f"), ("model", "default"), ("name", "digits"),
                                          ("rollout", "r1"), ("status", "halted"),
                                          ("version", "1.2.0")))  # fmt: skip
    assert got[status] == 1
    outcome = (
        "edgeship_rollout_devices",
        (("fleet", "f"), ("outcome", "failed"), ("rollout", "r1")),
    )
    assert got[outcome] == 1


def test_a_store_that_fails_gives_store_up_zero_not_a_failed_scrape(store: SqliteStore) -> None:
    collector = FleetCollector(store, clock=lambda: NOW)
    store.close()
    assert scrape(collector) == {("edgeship_fleet_store_up", ()): 0}


def test_fleet_metrics_serves_the_store_over_http(store: SqliteStore) -> None:
    server = MetricsServer(FleetCollector(store), port=0)
    try:
        with urllib.request.urlopen(server.url, timeout=10) as response:
            text = response.read().decode()
    finally:
        server.close()
    assert 'edgeship_device_online{device="d1",fleet="f"} 1.0' in text


def test_fleet_metrics_refuses_a_port_in_use_with_a_json_error(
    store: SqliteStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = MetricsServer(FleetCollector(store), port=0)
    try:
        db = str(tmp_path / "fleet.sqlite")
        argv = ["fleet", "metrics", "--db", db, "--metrics-port", str(server.port), "--json"]
        assert main(argv) == 1
    finally:
        server.close()
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "config"
    assert "--metrics-port" in error["message"]


def test_the_scrape_bench_runs_and_counts_every_devices_series() -> None:
    bench = Path(__file__).resolve().parents[3] / "bench" / "metrics.py"
    argv = [sys.executable, str(bench), "--devices", "4", "--messages", "2", "--runs", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    sqlite = json.loads(done.stdout)["sqlite"]
    assert 10 <= sqlite["series_per_device_max"] <= DEVICE_SERIES + MODEL_SERIES + 3
    assert sqlite["scrape_over_raw"] > 0


def test_a_scrape_recovers_after_postgres_restarts(
    pg_factory: Callable[[], PgServer],
) -> None:
    # The exporter outlives its database: while PostgreSQL is down a scrape says so
    # (store_up 0), and once it is back the next scrape reads the fleet again.
    pg = pg_factory()
    store = open_store(create_database(pg.url))
    try:
        store.write(
            [StatusRecord("f", "d1", NOW - 30, "online", {}, "{}"), telemetry("d1", 1)], NOW
        )
        collector = FleetCollector(store, clock=lambda: NOW)
        assert scrape(collector)[("edgeship_fleet_store_up", ())] == 1
        pg.stop("fast")
        assert scrape(collector) == {("edgeship_fleet_store_up", ()): 0}
        pg.start()
        deadline = time.monotonic() + 30
        while scrape(collector)[("edgeship_fleet_store_up", ())] != 1:
            assert time.monotonic() < deadline, "the exporter never read the store again"
            time.sleep(0.2)
        assert scrape(collector)[dev("edgeship_device_online")] == 1
    finally:
        store.close()
