"""The collector: message parsing, and real devices -> real mosquitto -> database."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import Message, publish_many
from sdk.cli import main
from sdk.fleet.collect import Collector, default_group, parse_message
from sdk.fleet.records import StatusRecord, TelemetryRecord
from sdk.fleet.store import PostgresStore, SqliteStore
from tests.support.broker import Broker, free_port
from tests.support.fake_device import start_devices


def body(**fields: object) -> bytes:
    return json.dumps({"v": 1, "fleet": "f", "device": "d1", "ts": 1.5, **fields}).encode()


def test_telemetry_key_metrics_become_columns() -> None:
    payload = body(
        seq=3,
        metrics={
            "requests": 10, "error_count": 1,
            "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
            "model": {"name": "digits", "version": "1.0", "sequence": 4},
        },
        drift={"band": "moderate", "inputs": [{"psi_max": 0.12}, {"psi_max": None}]},
    )  # fmt: skip
    r = parse_message("edgeship/v1/f/d1/telemetry", payload)
    assert isinstance(r, TelemetryRecord)
    assert (r.seq, r.requests, r.error_count, r.p95_ms) == (3, 10, 1, 2.0)
    assert (r.model_name, r.model_version, r.model_sequence) == ("digits", "1.0", 4)
    assert (r.drift_band, r.psi_max) == ("moderate", 0.12)


def test_a_birth_carries_the_attributes() -> None:
    r = parse_message("edgeship/v1/f/d1/status", body(status="online", attributes={"a": 1}))
    assert isinstance(r, StatusRecord)
    assert r.attributes == {"a": 1}


def test_an_empty_retained_payload_is_no_record() -> None:
    assert parse_message("edgeship/v1/f/d1/state", b"") is None


def test_body_values_no_database_column_can_hold_become_none() -> None:
    # A NUL in text (PostgreSQL refuses it) or an integer past 64 bits (both databases
    # refuse it) would fail the whole batch it came in.
    payload = body(
        seq=3,
        metrics={"requests": 2**63, "error_count": -(2**63), "model": {"name": "a\u0000b"}},
    )
    r = parse_message("edgeship/v1/f/d1/telemetry", payload)
    assert isinstance(r, TelemetryRecord)
    assert (r.requests, r.error_count, r.model_name) == (None, -(2**63), None)


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("edgeship/v1/f/d1/telemetry", body()),  # no seq
        ("edgeship/v1/f/d1/telemetry", body(seq=0)),
        ("edgeship/v1/f/d1/telemetry", body(seq=2**63)),  # past a 64-bit column
        ("edgeship/v1/f/d1/events", json.dumps({"v": 2, "ts": 1, "seq": 1}).encode()),
        ("edgeship/v1/f/other/events", body(seq=1)),  # sender differs from topic
        ("edgeship/v1/f/d1/events", b"[1]"),
        ("edgeship/v1/f/d1/events", b"{not json"),
        ("edgeship/v1/f/d1/infer/request", body(seq=1)),
        ("other/v1/f/d1/events", body(seq=1)),
        ("edgeship/v1/f/d1/status", json.dumps({"v": 1, "status": "online"}).encode()),
    ],
)
def test_malformed_messages_are_rejected(topic: str, payload: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - every malformed message is a ValueError
        parse_message(topic, payload)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def count(db: Path, table: str) -> int:
    store = SqliteStore(db)
    try:
        return int(store.query(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])
    finally:
        store.close()


@pytest.mark.integration
def test_devices_telemetry_is_stored_deduplicated_with_gaps(broker: Broker, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "fleet.sqlite")
    client = MqttClient(BrokerConfig(broker.url))
    client.connect()
    collector = Collector(client, store, fleet="f")
    collector.start()
    (dev,) = start_devices(broker.host, broker.port, "f", ["d1"], attributes={"arch": "aarch64"})
    try:
        for _ in range(5):
            dev.send_telemetry()
        dev.send_telemetry(seq=3)  # an at-least-once re-send
        dev.seq += 2  # seqs 6 and 7 lost on the device
        dev.send_telemetry()
        assert wait_until(lambda: collector.stats.received >= 8)  # 6 telemetry + birth + 1
    finally:
        dev.stop()
        client.stop()
        collector.stop()
    rows = store.query("SELECT seq FROM telemetry ORDER BY seq")
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 8]
    assert collector.stats.duplicates == 1
    assert store.query("SELECT first_seq, last_seq FROM gaps") == [{"first_seq": 6, "last_seq": 7}]
    device = store.query("SELECT status, attributes FROM devices")[0]
    assert json.loads(device["attributes"]) == {"arch": "aarch64"}
    store.close()


def test_the_default_group_is_named_after_the_store_however_its_path_is_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    stores = [SqliteStore(Path(p)) for p in ("fleet.sqlite", "sub/../fleet.sqlite", "other.sqlite")]
    try:
        groups = [default_group(s.location) for s in stores]
    finally:
        for s in stores:
            s.close()
    assert groups[0] == groups[1] != groups[2]


@pytest.mark.integration
def test_the_default_group_of_a_postgres_store_holds_no_password(postgres_url: str) -> None:
    with_password = postgres_url.replace("postgres@", "postgres:s3cr3t@")
    stores = [PostgresStore(postgres_url), PostgresStore(with_password)]
    try:
        assert stores[0].location == stores[1].location
        assert "s3cr3t" not in stores[1].location
    finally:
        for s in stores:
            s.close()


def test_an_explicit_group_wins_over_the_store_s(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "fleet.sqlite")
    client = MqttClient(BrokerConfig(BrokerUrl("127.0.0.1", 1, tls=False)))
    try:
        filters = Collector(client, store, fleet="f", share_group="g").topic_filters()
    finally:
        store.close()
    assert filters[:2] == [
        "$share/g/edgeship/v1/f/+/telemetry",
        "$share/g/edgeship/v1/f/+/events",
    ]


@pytest.mark.integration
def test_two_collectors_on_one_store_split_the_messages_by_default(
    broker: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "fleet.sqlite"
    collectors = []
    for _ in range(2):
        client = MqttClient(BrokerConfig(broker.url))
        client.connect()
        c = Collector(client, SqliteStore(db), fleet="f")
        c.start()
        collectors.append((client, c))
    devices = start_devices(broker.host, broker.port, "f", [f"d{i}" for i in range(4)])
    try:
        for _ in range(25):
            for d in devices:
                d.send_telemetry()
        assert wait_until(lambda: count(db, "telemetry") == 100)
    finally:
        for d in devices:
            d.stop()
        for client, c in collectors:
            client.stop()
            c.stop()
            c.store.close()
    stored = [c.stats.stored for _, c in collectors]
    assert all(n > 0 for n in stored)
    assert count(db, "gaps") == 0  # each collector's share alone has holes; together none


@pytest.mark.integration
def test_the_collect_and_fleet_status_commands(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "fleet.sqlite"
    devices = start_devices(broker.host, broker.port, "f", ["d1", "d2"])
    url = f"mqtt://{broker.host}:{broker.port}"
    try:
        # Retained births reach the collector even though they were sent before it started.
        assert (
            main(["collect", "--broker", url, "--db", str(db), "--duration", "1.5", "--json"]) == 0
        )
    finally:
        for d in devices:
            d.stop()
    stats = json.loads(capsys.readouterr().out)
    assert stats["stored"] >= 2
    assert main(["fleet", "status", "--db", str(db), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["device"], r["online"]) for r in rows] == [("d1", True), ("d2", True)]


def status_body(device: str, ts: float) -> bytes:
    return json.dumps(
        {"v": 1, "fleet": "f", "device": device, "ts": ts, "status": "online"}
    ).encode()


def wait_subscribed(client: MqttClient, sender: MqttClient) -> None:
    """Return once the broker applied ``client``'s subscriptions so far.

    Subscribing does not wait for the broker; a probe subscribed last that receives a
    message shows that every earlier subscription of the connection is in place.
    """
    seen = threading.Event()
    client.subscribe("test/probe", lambda _m: seen.set())
    deadline = time.monotonic() + 10
    while not seen.is_set() and time.monotonic() < deadline:
        sender.publish("test/probe", b"")
        seen.wait(0.05)
    assert seen.is_set()


@pytest.mark.integration
def test_messages_arriving_within_the_batch_wait_share_one_transaction(
    broker: Broker, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "fleet.sqlite")
    client, sender = MqttClient(BrokerConfig(broker.url)), MqttClient(BrokerConfig(broker.url))
    client.connect()
    sender.connect()
    # A long wait: the batch is complete when max_batch messages are there, not before.
    collector = Collector(client, store, fleet="f", max_batch=5, batch_wait_s=30.0)
    collector.start()
    try:
        wait_subscribed(client, sender)
        statuses = [(f"edgeship/v1/f/d{i}/status", status_body(f"d{i}", 1.0 + i)) for i in range(5)]
        publish_many(sender, statuses)
        assert wait_until(lambda: collector.stats.stored == 5)
    finally:
        sender.stop()
        client.stop()
        collector.stop()
        store.close()
    assert collector.stats.batches == 1


@pytest.mark.integration
def test_stopping_writes_a_partial_batch_at_once(broker: Broker, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "fleet.sqlite")
    client, sender = MqttClient(BrokerConfig(broker.url)), MqttClient(BrokerConfig(broker.url))
    client.connect()
    sender.connect()
    collector = Collector(client, store, fleet="f", batch_wait_s=3600.0)
    collector.start()
    queued: list[Message] = []
    # Same filter as the collector's: one delivery, handed to the collector's queue first.
    client.subscribe("edgeship/v1/f/+/status", queued.append)
    stopper = threading.Thread(target=collector.stop)
    try:
        wait_subscribed(client, sender)
        publish_many(
            sender, [(f"edgeship/v1/f/d{i}/status", status_body(f"d{i}", 1.0)) for i in range(3)]
        )
        assert wait_until(lambda: len(queued) == 3)
    finally:
        sender.stop()
        client.stop()
        stopper.start()
        stopper.join(30)  # far less than the batch wait: stop() must not wait for it
    assert not stopper.is_alive()
    assert (collector.stats.stored, collector.stats.batches) == (3, 1)
    assert len(store.query("SELECT status FROM devices WHERE status = 'online'")) == 3
    store.close()


@pytest.mark.integration
def test_a_restarted_collector_stores_what_its_session_queued_while_it_was_away(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The broker delivers a persistent session's queue right after the CONNACK: a collector
    # that subscribed only after connecting acknowledged those messages and dropped them.
    db = tmp_path / "fleet.sqlite"
    url = f"mqtt://{broker.host}:{broker.port}"
    argv = ["collect", "--broker", url, "--db", str(db), "--client-id", "c1",
            "--session-expiry", "600", "--duration", "0.5", "--json"]  # fmt: skip
    assert main(argv) == 0  # registers the session and its subscriptions
    with MqttClient(BrokerConfig(broker.url)) as sender:
        publish_many(
            sender,
            (("edgeship/v1/f/d1/telemetry", body(seq=seq, interval_s=1.0)) for seq in
             range(1, 201)),
        )  # fmt: skip
    capsys.readouterr()
    assert main([*argv[:-3], "--duration", "2", "--json"]) == 0
    assert count(db, "telemetry") == 200


@pytest.mark.integration
def test_collect_logs_in_with_a_user_name_and_a_password_file(
    broker_factory: Callable[..., Broker], tmp_path: Path
) -> None:
    broker = broker_factory(users={"collector": "s3cr3t"})
    (tmp_path / "pw").write_text("s3cr3t\n")
    argv = ["collect", "--broker", str(broker.url), "--username", "collector",
            "--password-file", str(tmp_path / "pw"), "--db", str(tmp_path / "fleet.sqlite"),
            "--duration", "0.3", "--json"]  # fmt: skip
    assert main(argv) == 0


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--broker", "mqtt://alice:s3cr3t@127.0.0.1"], "--username for edgeship"),
        (["--broker", "mqtt://127.0.0.1/fleet"], "must be mqtt://HOST[:PORT]"),
        (["--broker", "mqtt://127.0.0.1", "--ca-file", "ca.crt"], "need an mqtts:// --broker"),
        (["--broker", "mqtt://127.0.0.1", "--password-file", "pw"], "--password-file needs"),
        (["--session-expiry", "60"], "--session-expiry needs --client-id"),
        (["--connect-timeout", "0"], "--connect-timeout must be positive"),
    ],
)
def test_collect_refuses_broker_options_that_break_the_rules(
    options: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "fleet.sqlite"
    assert main(["collect", *options, "--db", str(db), "--duration", "0"]) == 1
    err = capsys.readouterr().err
    assert says in err
    assert "s3cr3t" not in err
    assert not db.exists()  # refused before anything was opened


@pytest.mark.integration
def test_collect_without_a_broker_fails_fast_and_leaves_no_writer_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["collect", "--broker", url, "--db", str(tmp_path / "f.sqlite"), "--json"]) == 1
    assert time.monotonic() - started < 10
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "broker"
    assert f"cannot connect to the MQTT broker at {url}" in error["message"]
    assert "edgeship-collect" not in {t.name for t in threading.enumerate()}
