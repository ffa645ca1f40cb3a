"""The collector under real faults: nothing the broker acknowledged to a device is lost.

Real peers throughout: mosquitto (tests/support/broker.py), PostgreSQL servers that are
stopped and started (tests/support/postgres.py), ``edgeship collect`` as a subprocess
killed with SIGKILL (tests/support/collector.py), and devices running the agent's own
Reporter and durable Outbox (tests/support/fake_device.py). What must be stored is
counted from the devices' outboxes — a message leaves one only on the broker's PUBACK —
never from the collector's own counters.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import Message, publish_many
from sdk.fleet.collect import MAX_HELD, Collector
from sdk.fleet.store import SqliteStore, open_store
from tests.support.broker import Broker
from tests.support.collector import COLLECT, ROOT, CollectorProcess
from tests.support.fake_device import ReportingDevice
from tests.support.postgres import PgServer, create_database

pytestmark = pytest.mark.integration

Key = tuple[str, int]


class Pacer:
    """Reports telemetry from ``devices`` in turn, ``per_s`` messages a second in all."""

    def __init__(self, devices: list[ReportingDevice], per_s: float) -> None:
        self._stop = threading.Event()

        def run() -> None:
            n = 0
            while not self._stop.wait(1.0 / per_s):
                devices[n % len(devices)].report()
                n += 1

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def devices(broker: Broker, tmp_path: Path) -> Iterator[Callable[[int], list[ReportingDevice]]]:
    made: list[ReportingDevice] = []

    def start(n: int) -> list[ReportingDevice]:
        new = [
            ReportingDevice(broker.host, broker.port, "f", f"d{i}", tmp_path).start()
            for i in range(len(made), len(made) + n)
        ]
        made.extend(new)
        return new

    yield start
    for d in made:
        d.stop()


def acked(devices: list[ReportingDevice]) -> list[Key]:
    """Every (device, seq) the broker acknowledged, once each device's outbox is empty."""
    assert all(d.reporter.flush(30) for d in devices), "a device's outbox did not drain"
    return sorted((d.device, seq) for d in devices for seq in d.acked())


def stored(db: str) -> list[Key]:
    store = open_store(db)
    try:
        rows = store.query("SELECT device, seq FROM telemetry")
    finally:
        store.close()
    return sorted((str(r["device"]), int(r["seq"])) for r in rows)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_every_seq_the_broker_acknowledged_is_stored_once_across_a_postgres_restart_and_a_kill_9(
    collect_processes: Callable[..., CollectorProcess],
    broker: Broker,
    pg_factory: Callable[[], PgServer],
    devices: Callable[[int], list[ReportingDevice]],
    tmp_path: Path,
) -> None:
    pg = pg_factory()
    db = create_database(pg.url)
    kept = ("--client-id", "c1")  # the broker keeps the session while the collector is dead
    first = collect_processes(broker, db, tmp_path / "first.log", options=kept)
    fleet = devices(4)
    pacer = Pacer(fleet, per_s=200)
    try:
        time.sleep(1.0)
        pg.stop("fast")  # every session is ended, as by a restart
        time.sleep(1.5)
        pg.start()
        assert wait_until(lambda: "the store is back" in first.stderr(), 30), first.stderr()
        time.sleep(0.5)
        first.kill()  # while the devices publish and batches are being written
        second = collect_processes(broker, db, tmp_path / "second.log", options=kept)
        time.sleep(1.0)
    finally:
        pacer.stop()
    expected = acked(fleet)
    assert len(expected) > 500
    assert wait_until(lambda: len(stored(db)) >= len(expected)), second.stderr()
    code, stats = second.stop()
    assert stored(db) == expected  # every acknowledged seq, once, and nothing else
    assert (code, stats["store"], stats["unstored"]) == (0, "ok", 0)
    # Once when the outage began, once when it ended.
    assert first.stderr().count("cannot store:") == 1
    assert first.stderr().count("the store is back") == 1


def test_what_the_collector_held_when_the_broker_restarted_is_stored_once_after(
    collect_processes: Callable[..., CollectorProcess],
    broker: Broker,
    devices: Callable[[int], list[ReportingDevice]],
    tmp_path: Path,
) -> None:
    db = tmp_path / "fleet.sqlite"
    log = tmp_path / "collect.log"
    collector = collect_processes(broker, str(db), log, options=("--client-id", "c1"))
    fleet = devices(4)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the collector holds what it receives, unacknowledged
    for _ in range(50):
        for d in fleet:
            d.report()
    acked(fleet)  # all in the broker's hands (and the collector's, unacknowledged)
    subscribed = broker.log().count(" 1 $share/")
    broker.restart()  # SIGTERM: mosquitto saves the session and what it holds for it
    # mosquitto 2.0.11 does not restore shared subscriptions from its persistence file:
    # until the collector subscribes again, what devices publish has no subscriber.
    assert wait_until(lambda: broker.log().count(" 1 $share/") >= subscribed + 2, 30)
    for _ in range(50):
        for d in fleet:
            d.report()
    expected = acked(fleet)
    locker.execute("ROLLBACK")
    locker.close()
    assert wait_until(lambda: len(stored(str(db))) >= len(expected)), collector.stderr()
    code, stats = collector.stop()
    assert stored(str(db)) == expected  # each once: the redelivered copies were duplicates
    assert code == 0
    # The held copies could not be acknowledged on the new connection; the broker's
    # redelivered copies were, as duplicates.
    assert stats["unacked"] > 0
    assert stats["duplicates"] > 0


@pytest.mark.parametrize("peer", ["nothing listens", "a listener that never answers"])
def test_collect_without_a_broker_exits_non_zero_within_its_connect_timeout(
    peer: str, tmp_path: Path
) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        if peer != "nothing listens":
            server.listen()  # TCP connects; no CONNACK ever comes
        url = f"mqtt://127.0.0.1:{server.getsockname()[1]}"
        argv = ["--broker", url, "--db", str(tmp_path / "f.sqlite"), "--connect-timeout", "2"]
        started = time.monotonic()
        done = subprocess.run(
            [*COLLECT, *argv, "--duration", "600"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        took = time.monotonic() - started
    assert done.returncode == 1
    assert f"error: cannot connect to the MQTT broker at {url}" in done.stderr
    assert took < 2 + 5  # the connect timeout, plus starting Python


def test_a_store_that_refuses_for_good_stops_collect_and_acknowledges_nothing_unstored(
    collect_processes: Callable[..., CollectorProcess], broker: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "fleet.sqlite"
    open_store(str(db)).close()
    kept = ("--client-id", "c1")
    collector = collect_processes(broker, str(db), tmp_path / "collect.log", options=kept)
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE telemetry RENAME TO telemetry_away")
    body = {"v": 1, "fleet": "f", "device": "d1", "ts": 1.5, "seq": 1}
    with MqttClient(BrokerConfig(broker.url)) as sender:
        publish_many(sender, [("edgeship/v1/f/d1/telemetry", json.dumps(body).encode())])
    code, stats = collector.wait(30)
    assert (code, stats["store"], stats["stored"]) == (1, "failed", 0)
    assert stats["error"]["code"] == "store"
    assert "no such table: telemetry" in stats["error"]["message"]
    assert "fix the file" in stats["error"]["message"]
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE telemetry_away RENAME TO telemetry")
    again = collect_processes(broker, str(db), tmp_path / "again.log", options=kept)
    # The broker kept the unacknowledged message for the session.
    assert wait_until(lambda: stored(str(db)) == [("d1", 1)], 30), again.stderr()
    assert again.stop()[0] == 0


# --- in-process collectors ----------------------------------------------------------------


@pytest.fixture
def collectors(broker: Broker) -> Iterator[Callable[..., Collector]]:
    """Collectors on real clients with manual acknowledgement; stopped at teardown."""
    made: list[Collector] = []

    def start(store: SqliteStore, *, max_held: int = MAX_HELD, **options: object) -> Collector:
        client = MqttClient(BrokerConfig(broker.url), manual_ack=True, max_unacked=max_held)
        collector = Collector(client, store, fleet="f", **options)  # type: ignore[arg-type]
        made.append(collector)
        collector.start()
        client.connect()
        publish_many(client, [("probe/none", b"")])  # after the SUBSCRIBEs: they are in place
        return collector

    yield start
    for c in made:
        c.stop()
        c.store.close()


def test_collectors_on_two_stores_each_store_every_message_by_default(
    collectors: Callable[..., Collector],
    devices: Callable[[int], list[ReportingDevice]],
    tmp_path: Path,
) -> None:
    dbs = [str(tmp_path / "a.sqlite"), str(tmp_path / "b.sqlite")]
    pair = [collectors(SqliteStore(Path(db))) for db in dbs]
    assert pair[0].share_group != pair[1].share_group
    fleet = devices(2)
    for _ in range(30):
        for d in fleet:
            d.report()
    expected = acked(fleet)
    for db in dbs:
        assert wait_until(lambda db=db: stored(db) == expected, 30)


def test_while_sqlite_is_locked_the_collector_holds_a_bounded_batch_and_stores_it_once_free(
    collectors: Callable[..., Collector],
    broker: Broker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = tmp_path / "fleet.sqlite"
    collector = collectors(
        SqliteStore(db, busy_timeout_s=0.05), max_held=10, retry_initial_s=0.05, retry_max_s=0.2
    )
    taken: list[Message] = []  # what the client took from the broker, beside the collector
    collector.transport.subscribe(collector.topic_filters()[0], taken.append)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    messages = [
        (
            f"edgeship/v1/f/d{i % 3}/telemetry",
            json.dumps(
                {"v": 1, "fleet": "f", "device": f"d{i % 3}", "ts": 1.0, "seq": 1 + i // 3}
            ).encode(),
        )
        for i in range(60)
    ]
    with MqttClient(BrokerConfig(broker.url)) as sender:
        publish_many(sender, messages)
    assert wait_until(lambda: collector.stats.store == "unavailable", 10)
    time.sleep(0.5)
    assert 0 < len(taken) <= 10  # the broker keeps the rest queued
    locker.execute("ROLLBACK")
    locker.close()
    assert wait_until(lambda: collector.stats.stored == 60, 30)
    assert (collector.stats.outages, collector.stats.store) == (1, "ok")
    assert caplog.text.count("cannot store:") == 1
    assert caplog.text.count("the store is back") == 1
