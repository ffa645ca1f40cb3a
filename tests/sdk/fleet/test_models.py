"""Several models per device on the fleet side: the collector's parsing and storage (one
row per model, a mismatched model refused), the migration of an older store, ``fleet
status`` per model, ``publish --model``, and the metrics' model label."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from sdk.cli import main
from sdk.fleet._migrations import MIGRATIONS
from sdk.fleet.collect import Collector, parse_message
from sdk.fleet.metrics import FleetCollector
from sdk.fleet.records import StateRecord, TelemetryRecord
from sdk.fleet.status import fleet_status
from sdk.fleet.store import PostgresStore, SqliteStore, Store, open_store
from tests.sdk.fleet._model_device import SERVING, ModelDevice, Window
from tests.sdk.fleet._rollouts import Served, serve_bundle
from tests.sdk.fleet.test_metrics import scrape
from tests.support.broker import Broker, Subscriber

OCR = "ocr"


def body(**fields: object) -> bytes:
    return json.dumps({"v": 1, "fleet": "f", "device": "d1", "ts": 5.0, **fields}).encode()


def state(model: str | None, digest: str, device: str = "d1", **extra: object) -> bytes:
    current = {"digest": digest, "name": "digits", "version": "1.0.0", "sequence": 3}
    fields: dict[str, Any] = {"device": device, "current": current, **extra}
    if model is not None:
        fields["model"] = model
    return body(**fields)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = open_store(str(tmp_path / "fleet.sqlite"))
        assert isinstance(s, SqliteStore)
    else:
        s = open_store(request.getfixturevalue("postgres_url"))
        assert isinstance(s, PostgresStore)
    yield s
    s.close()


# --- parsing ---------------------------------------------------------------------------


def test_a_named_models_state_topic_makes_a_state_of_that_model() -> None:
    r = parse_message("edgeship/v1/f/d1/models/ocr/state", state(OCR, "cc" * 32))
    assert isinstance(r, StateRecord)
    assert (r.model, r.current_digest) == (OCR, "cc" * 32)


@pytest.mark.parametrize(
    ("topic", "model", "error"),
    [
        ("edgeship/v1/f/d1/models/ocr/state", "asr", "model 'asr' on the topic of 'ocr'"),
        ("edgeship/v1/f/d1/models/ocr/state", None, "model 'default' on the topic of 'ocr'"),
        ("edgeship/v1/f/d1/state", OCR, "model 'ocr' on the topic of 'default'"),
        ("edgeship/v1/f/d1/models/default/state", "default", "not an edgeship v1 device topic"),
        ("edgeship/v1/f/d1/models/Bad!/state", "Bad!", "not an edgeship v1 device topic"),
        ("edgeship/v1/f/d1/models/ocr/telemetry", OCR, "not an edgeship v1 device topic"),
    ],
)
def test_a_state_whose_model_disagrees_with_its_topic_is_refused(
    topic: str, model: str | None, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        parse_message(topic, state(model, "cc" * 32))


def test_telemetry_and_events_name_their_model_absent_meaning_default() -> None:
    named = parse_message("edgeship/v1/f/d1/telemetry", body(seq=1, model=OCR))
    older = parse_message("edgeship/v1/f/d1/events", body(seq=2, event="committed"))
    assert (named.model, older.model) == (OCR, "default")  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="a model name"):
        parse_message("edgeship/v1/f/d1/events", body(seq=3, event="x", model="../x"))


def test_per_version_numbers_of_a_telemetry_window_are_read() -> None:
    versions = [
        Window(80, errors=2, p95_ms=3.0, labels=10, correct=9).entry("aa" * 32, "serving"),
        Window(20, p95_ms=4.0).entry("bb" * 32, "candidate"),
        {"role": "shadow"},  # no digest: nothing to key it by
    ]
    r = parse_message("edgeship/v1/f/d1/telemetry", body(seq=1, versions=versions))
    assert isinstance(r, TelemetryRecord)
    got = [(v.digest[:2], v.role, v.requests, v.error_count, v.p95_ms, v.labels, v.correct)
           for v in r.versions]  # fmt: skip
    assert got == [("aa", "serving", 80, 2, 3.0, 10, 9), ("bb", "candidate", 20, 0, 4.0, 0, 0)]


# --- storage and status ----------------------------------------------------------------


def records(*messages: tuple[str, bytes]) -> list[Any]:
    return [parse_message(topic, payload) for topic, payload in messages]


def test_two_models_of_one_device_keep_their_own_state_and_totals(store: Store) -> None:
    store.write(
        records(
            ("edgeship/v1/f/d1/state", state(None, "aa" * 32)),
            ("edgeship/v1/f/d1/models/ocr/state", state(OCR, "cc" * 32)),
            ("edgeship/v1/f/d1/telemetry", body(seq=1, metrics={"requests": 10})),
            ("edgeship/v1/f/d1/telemetry", body(seq=2, model=OCR, metrics={"requests": 7})),
            ("edgeship/v1/f/d1/status", body(status="online")),
        ),
        6.0,
    )
    # A newer state of one model does not touch the other's.
    store.write(records(("edgeship/v1/f/d1/state", state(None, "bb" * 32))), 7.0)
    rows = store.query(
        "SELECT model, current_digest, requests_total FROM device_models ORDER BY model"
    )
    assert [(r["model"], r["current_digest"][:2], r["requests_total"]) for r in rows] == [
        ("default", "bb", 10),
        (OCR, "cc", 7),
    ]
    status = fleet_status(store, now=8.0)
    assert [(s.device, s.model, s.online) for s in status] == [
        ("d1", "default", True),
        ("d1", OCR, True),
    ]
    assert [s.model for s in fleet_status(store, now=8.0, model=OCR)] == [OCR]


def test_status_shows_shadow_split_and_online_accuracy_from_the_state(store: Store) -> None:
    shadow = {"digest": "dd" * 32, "samples": 150, "agreement": 0.993, "latency_ratio": 1.1,
              "accuracy": None, "dropped": 0, "verdict": "watching"}  # fmt: skip
    feedback = {"aa" * 32: {"labels": 200, "correct": 190}, "dd" * 32: {"labels": 0, "correct": 0}}
    split = {"digest": "ee" * 32, "share": 0.2}
    d1 = state(None, "aa" * 32, shadow=shadow, feedback=feedback)
    d2 = state(None, "aa" * 32, "d2", split=split)
    store.write(records(("edgeship/v1/f/d1/state", d1), ("edgeship/v1/f/d2/state", d2)), 6.0)
    rows = {s.device: s for s in fleet_status(store, now=7.0)}
    assert rows["d1"].shadow == shadow
    assert rows["d1"].feedback == {
        "aa" * 32: {"labels": 200, "correct": 190, "accuracy": 0.95},
        "dd" * 32: {"labels": 0, "correct": 0, "accuracy": None},
    }
    assert (rows["d1"].split, rows["d2"].split) == (None, split)


def test_the_status_command_has_a_model_column_and_filter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # the whole table, not wrapped
    db = str(tmp_path / "fleet.sqlite")
    s = open_store(db)
    shadow = {"digest": "dd" * 32, "samples": 150, "agreement": 0.993, "latency_ratio": 1.1,
              "verdict": "watching"}  # fmt: skip
    s.write(
        records(
            ("edgeship/v1/f/d1/state", state(None, "aa" * 32)),
            ("edgeship/v1/f/d1/models/ocr/state", state(OCR, "cc" * 32, shadow=shadow)),
        ),
        time.time(),
    )
    s.close()
    assert main(["fleet", "status", "--db", db, "--model", OCR, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["device"], r["model"], r["shadow"]["samples"]) for r in rows] == [("d1", OCR, 150)]
    assert main(["fleet", "status", "--db", db]) == 0
    table = capsys.readouterr().out
    assert "model" in table
    assert "shadow dddddddddddd watching: 150 samples, 99.3% agree" in table


# --- migration -------------------------------------------------------------------------


def test_a_store_of_schema_3_moves_each_devices_state_to_model_default(tmp_path: Path) -> None:
    db = tmp_path / "fleet.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at DOUBLE PRECISION NOT NULL)"
        )
        for version, name, script in MIGRATIONS[:3]:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, ?, 1.0)", (version, name))
        conn.execute(
            "INSERT INTO devices (fleet, device, state, state_ts, current_digest, current_name,"
            " current_version, telemetry_seq, requests_total, errors_total) VALUES"
            " ('f', 'd1', '{}', 5.0, ?, 'digits', '1.0.0', 4, 300, 2)",
            ("aa" * 32,),
        )
        conn.execute(
            "INSERT INTO events (fleet, device, seq, ts, received_at, event, raw)"
            " VALUES ('f', 'd1', 3, 1.0, 1.0, 'committed', '{}')"
        )
    store = open_store(str(db))
    try:
        rows = store.query("SELECT * FROM device_models")
        assert [(r["model"], r["current_name"], r["telemetry_seq"], r["requests_total"])
                for r in rows] == [("default", "digits", 4, 300)]  # fmt: skip
        assert store.query("SELECT model FROM events") == [{"model": "default"}]
        (row,) = fleet_status(store, now=6.0)
        assert (row.model, row.name, row.version) == ("default", "digits", "1.0.0")
    finally:
        store.close()


# --- metrics ---------------------------------------------------------------------------


def test_each_model_of_a_device_has_its_own_series(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "fleet.sqlite")
    now = time.time()
    store.write(
        records(
            ("edgeship/v1/f/d1/status", body(status="online")),
            ("edgeship/v1/f/d1/telemetry", body(seq=1, ts=now, metrics={"requests": 10})),
            ("edgeship/v1/f/d1/telemetry", body(seq=2, ts=now, model=OCR, metrics={"requests": 7})),
        ),
        now,
    )
    got = scrape(FleetCollector(store, clock=lambda: now))
    store.close()
    requests = {
        dict(labels)["model"]: v
        for (name, labels), v in got.items()
        if name == "edgeship_device_requests_total"
    }
    assert requests == {"default": 10, OCR: 7}
    online = [labels for name, labels in got if name == "edgeship_device_online"]
    assert online == [(("device", "d1"), ("fleet", "f"))]  # the device's, once


# --- with a broker ---------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve_bundle(tmp_path)


@pytest.mark.integration
def test_publish_sets_a_named_models_desired_state(
    broker: Broker, served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["publish", str(served.bundle), "--url", served.url, "--fleet", "f",
            "--broker", str(broker.url), "--device", "d1", "--model", OCR, "--json"]  # fmt: skip
    with Subscriber(broker, "edgeship/v1/f/#", clean=True) as sub:
        assert main(argv) == 0
        sub.wait_for(lambda ms: any(m.topic.endswith("/desired") for m in ms))
        sent = [(m.topic, json.loads(m.payload)) for m in sub.snapshot()]
    assert [(t, d["model"], d["bundle"]["sequence"]) for t, d in sent] == [
        ("edgeship/v1/f/d1/models/ocr/desired", OCR, 7)
    ]
    assert json.loads(capsys.readouterr().out)["model"] == OCR
    with pytest.raises(SystemExit) as usage:
        main([*argv[:-3], "--model", "Not A Name"])
    assert usage.value.code == 2


@pytest.mark.integration
def test_the_collector_stores_named_models_states_and_refuses_a_mismatch(
    broker: Broker, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "fleet.sqlite")
    client = MqttClient(BrokerConfig(broker.url))
    collector = Collector(client, store, fleet="f")
    collector.start()  # subscribed from the connect on
    client.connect()
    device = ModelDevice(broker, "f", "d1", OCR).start()
    liar = MqttClient(BrokerConfig(broker.url))
    liar.connect()

    reader = SqliteStore(tmp_path / "fleet.sqlite")  # its own connection, as another host

    def stored() -> list[dict[str, Any]]:
        rows = reader.query("SELECT DISTINCT model, role, requests FROM telemetry_versions")
        return sorted(rows, key=lambda r: r["role"])

    try:
        liar.publish("edgeship/v1/f/d2/models/ocr/state", state("asr", "cc" * 32), retain=True)
        deadline = time.monotonic() + 10
        while (not stored() or collector.stats.rejected < 1) and time.monotonic() < deadline:
            device.telemetry("bb" * 32)  # again, until the shared subscription has it
            time.sleep(0.2)
        versions = stored()
    finally:
        device.stop()
        liar.publish("edgeship/v1/f/d2/models/ocr/state", b"", retain=True)
        liar.stop()
        client.stop()
        collector.stop()
        reader.close()
    assert collector.stats.rejected == 1
    rows = store.query("SELECT device, model, current_digest FROM device_models")
    assert rows == [{"device": "d1", "model": OCR, "current_digest": SERVING["digest"]}]
    assert versions == [
        {"model": OCR, "role": "candidate", "requests": 25},
        {"model": OCR, "role": "serving", "requests": 100},
    ]
    store.close()


def test_the_report_lists_each_model_with_its_candidate_and_accuracy(tmp_path: Path) -> None:
    from sdk.fleet.report import render_report  # noqa: PLC0415 - plotly, for a report only

    store = SqliteStore(tmp_path / "fleet.sqlite")
    split = {"digest": "ee" * 32, "share": 0.2}
    feedback = {"aa" * 32: {"labels": 200, "correct": 190}}
    store.write(
        records(
            ("edgeship/v1/f/d1/state", state(None, "aa" * 32, feedback=feedback)),
            ("edgeship/v1/f/d1/models/ocr/state", state(OCR, "cc" * 32, split=split)),
        ),
        6.0,
    )
    page = render_report(store, now=7.0)
    store.close()
    rows = page.split('<table id="devices">')[1].split("</table>")[0].split("<tr>")[2:]
    assert [r.count("<td>") for r in rows] == [11, 11]
    assert "<td>default</td>" in rows[0]
    assert "<td>aaaaaaaaaaaa 95.0% (200)</td>" in rows[0]
    assert "<td>ocr</td>" in rows[1]
    assert "<td>A/B eeeeeeeeeeee 20%</td>" in rows[1]
