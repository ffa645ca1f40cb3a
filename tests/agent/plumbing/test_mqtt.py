"""Telemetry through a real mosquitto: delivery, outages, crashes, TLS, ACL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.messages.status import device_presence
from agent.messages.topics import Topics
from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.tls import TlsConfig
from agent.telemetry import Metrics, Outbox, Reporter, TelemetryConfig
from tests.support.broker import Broker, ClientCert, Pki, Received, Subscriber

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
ACL_EXAMPLE = REPO / "examples" / "mosquitto" / "acl"


class Agent:
    """Outbox + MqttClient (with presence) + Reporter for one device, stopped at teardown."""

    def __init__(self, broker: Broker, state: Path, device: str = "d1", **mqtt: object) -> None:
        self.transport = MqttClient(
            BrokerConfig(
                broker.url,
                backoff_initial_s=0.05,
                backoff_max_s=0.3,
                connect_timeout_s=2.0,
                **mqtt,  # type: ignore[arg-type]
            ),
            presence=device_presence(Topics("f", device)),
        )
        self.outbox = Outbox(state / f"{device}.db")
        self.metrics = Metrics()
        self.reporter = Reporter(
            Topics("f", device),
            self.outbox,
            self.transport,
            metrics=self.metrics,
            config=TelemetryConfig(interval_s=3600),
        )
        self.transport.start()
        self.reporter.start()

    def close(self) -> None:
        self.reporter.stop()
        self.transport.stop()
        self.outbox.close()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(broker: Broker, device: str = "d1", **mqtt: object) -> Agent:
        a = Agent(broker, tmp_path, device, **mqtt)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


def _docs(msgs: list[Received], leaf: str) -> list[dict]:
    return [json.loads(m.payload) for m in msgs if m.topic.endswith("/" + leaf)]


def _first_seen_seqs(msgs: list[Received]) -> list[int]:
    seen: dict[int, None] = {}
    for m in msgs:
        if m.topic.endswith(("/telemetry", "/events")):
            seen.setdefault(json.loads(m.payload)["seq"], None)
    return list(seen)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_events_telemetry_birth_and_state_reach_a_subscriber(
    broker: Broker, agents: Callable[..., Agent], protocol: str
) -> None:
    with Subscriber(broker, "edgeship/v1/f/d1/#") as sub:
        agent = agents(broker, protocol=protocol)
        agent.metrics.set_model("digits", "1.0.0", 3)
        agent.metrics.record(0.004)
        agent.reporter.set_state({"current": {"sequence": 3}})
        agent.reporter.emit_event("rejected", reason="bad signature", sequence=4)
        agent.reporter.report_now()
        assert agent.reporter.flush(10)
        assert sub.wait_for(lambda m: len(_docs(m, "telemetry")) == 1 and _docs(m, "state"))
        msgs = sub.snapshot()
    (status,) = _docs(msgs, "status")
    assert (status["status"], status["v"], status["device"]) == ("online", 1, "d1")
    (event,) = _docs(msgs, "events")
    assert event["event"] == "rejected"
    assert event["reason"] == "bad signature"
    (telemetry,) = _docs(msgs, "telemetry")
    assert telemetry["metrics"]["requests"] == 1
    assert telemetry["metrics"]["model"]["sequence"] == 3
    assert (event["seq"], telemetry["seq"]) == (1, 2)
    assert all({"v", "device", "ts"} <= d.keys() for d in _docs(msgs, "telemetry"))
    assert _docs(msgs, "state")[-1]["current"] == {"sequence": 3}


def test_retained_status_and_state_greet_a_late_subscriber(
    broker: Broker, agents: Callable[..., Agent]
) -> None:
    with Subscriber(broker, "edgeship/v1/f/d1/+", client_id="early") as early:
        agent = agents(broker)
        agent.reporter.set_state({"current": None})
        # Once the early subscriber has both, the broker has stored both retained copies
        # (the birth message and the state are published independently, in either order).
        assert early.wait_for(
            lambda m: {x.topic.rsplit("/", 1)[1] for x in m} >= {"status", "state"}
        )
    with Subscriber(broker, "edgeship/v1/f/d1/+", client_id="late", clean=True) as sub:
        assert sub.wait_for(lambda m: len(m) >= 2)
        retained = {m.topic.rsplit("/", 1)[1]: m for m in sub.snapshot() if m.retain}
    assert json.loads(retained["status"].payload)["status"] == "online"
    assert json.loads(retained["state"].payload)["current"] is None


def test_a_clean_stop_publishes_offline_status(broker: Broker, tmp_path: Path) -> None:
    agent = Agent(broker, tmp_path)
    assert agent.transport.wait_connected(10)
    with Subscriber(broker, "edgeship/v1/f/d1/status") as sub:
        agent.close()
        assert sub.wait_for(lambda m: any(d["status"] == "offline" for d in _docs(m, "status")))
    assert _docs(sub.snapshot(), "status")[-1]["reason"] == "shutdown"


def test_broker_outage_loses_nothing_and_keeps_per_device_order(
    broker: Broker, agents: Callable[..., Agent]
) -> None:
    total = 300
    with Subscriber(broker, "edgeship/v1/f/+/#") as sub:
        agent = agents(broker)
        assert agent.transport.wait_connected(10)
        done = threading.Event()

        def produce() -> None:
            for i in range(total):
                agent.reporter.emit_event("download", i=i)
                time.sleep(0.005)
            done.set()

        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(0.3)
        broker.stop()  # SIGTERM: mosquitto saves what it acknowledged
        time.sleep(1.0)
        queued = agent.outbox.stats().rows
        broker.start()
        producer.join()
        assert agent.reporter.flush(20)
        assert sub.wait_for(lambda m: len(_first_seen_seqs(m)) == total, 20)
        msgs = sub.snapshot()
    assert queued > 0  # the outage really held messages back
    assert agent.transport.session >= 2  # and really forced a reconnect
    assert _first_seen_seqs(msgs) == list(range(1, total + 1))


def test_agent_killed_with_queued_messages_delivers_them_after_restart(
    broker: Broker, tmp_path: Path
) -> None:
    count = 25
    port = broker.port
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.agent.telemetry._agent", str(tmp_path), str(port)]
    with Subscriber(broker, "edgeship/v1/f/d1/#") as sub:
        broker.stop()
        with subprocess.Popen(
            [*cmd, "queue", str(count)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
        ) as agent:
            try:
                assert agent.stdout is not None
                assert agent.stdout.readline().strip() == "queued"
            finally:
                agent.send_signal(signal.SIGKILL)
                agent.wait(10)
        broker.start()
        drained = subprocess.run(
            [*cmd, "drain", "0"],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=60,
        )
        assert sub.wait_for(lambda m: len(_first_seen_seqs(m)) == count + 1)
        msgs = sub.snapshot()
    assert drained.stdout.strip() == str(count + 2)  # the sequence continued across the kill
    assert _first_seen_seqs(msgs) == list(range(1, count + 2))
    assert [d["i"] for d in _docs(msgs, "events")][:count] == list(range(count))


def test_a_killed_agent_is_marked_offline_by_its_last_will(broker: Broker, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.agent.telemetry._agent", str(tmp_path), str(broker.port)]
    with Subscriber(broker, "edgeship/v1/f/d1/status") as sub:
        with subprocess.Popen(
            [*cmd, "queue", "1"], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
        ) as agent:
            try:
                assert agent.stdout is not None
                assert agent.stdout.readline().strip() == "queued"
                assert sub.wait_for(
                    lambda m: any(d["status"] == "online" for d in _docs(m, "status"))
                )
            finally:
                agent.send_signal(signal.SIGKILL)
                agent.wait(10)
        assert sub.wait_for(lambda m: _docs(m, "status")[-1]["status"] == "offline")
    assert _docs(sub.snapshot(), "status")[-1]["reason"] == "connection-lost"


def _mtls_agent(agents: Callable[..., Agent], broker: Broker, cert: ClientCert | None) -> Agent:
    assert broker.pki is not None
    tls = TlsConfig(
        ca_file=broker.pki.ca_file,
        cert_file=None if cert is None else cert.cert_file,
        key_file=None if cert is None else cert.key_file,
    )
    return agents(broker, tls=tls)


def test_mtls_with_a_valid_client_certificate_connects_and_delivers(
    broker_factory: Callable[..., Broker], pki: Pki, agents: Callable[..., Agent]
) -> None:
    broker = broker_factory(tls="mtls", pki=pki)
    with Subscriber(broker, "edgeship/v1/f/d1/events", cert=pki.client("collector")) as sub:
        agent = _mtls_agent(agents, broker, pki.client("device-1"))
        agent.reporter.emit_event("activated", sequence=1)
        assert agent.reporter.flush(10)
        assert sub.wait_for(lambda m: len(m) == 1)


@pytest.mark.parametrize("which", ["missing", "foreign"])
def test_mtls_refuses_a_missing_or_foreign_certificate_and_the_agent_keeps_queuing(
    broker_factory: Callable[..., Broker], pki: Pki, agents: Callable[..., Agent], which: str
) -> None:
    broker = broker_factory(tls="mtls", pki=pki)
    agent = _mtls_agent(agents, broker, None if which == "missing" else pki.foreign)
    deadline = time.monotonic() + 10
    while agent.transport.last_error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.transport.last_error is not None
    seqs = [agent.reporter.emit_event("download", i=i) for i in range(3)]
    agent.reporter.report_now()
    assert seqs == [1, 2, 3]
    assert not agent.transport.connected
    assert agent.transport.session == 0
    assert agent.outbox.stats().rows == 4


def test_acl_lets_a_device_publish_only_its_own_topics_and_read_only_its_own_desired(
    broker_factory: Callable[..., Broker], pki: Pki, agents: Callable[..., Agent]
) -> None:
    broker = broker_factory(tls="mtls", pki=pki, acl=ACL_EXAMPLE.read_text())
    collector = pki.client("collector")
    with Subscriber(broker, "edgeship/v1/#", client_id="collector", cert=collector) as everything:
        d1 = _mtls_agent(agents, broker, pki.client("device-1"))
        desired_seen: list[str] = []
        d1.transport.subscribe("edgeship/v1/+/+/desired", lambda m: desired_seen.append(m.topic))
        assert d1.transport.wait_connected(10)
        # The collector (fleet side) sets desired state for two devices.
        with Subscriber(broker, "edgeship/v1/none", client_id="fleet", cert=collector) as fleet:
            for dev in ("device-1", "device-2"):
                fleet.client.publish(
                    f"edgeship/v1/f/{dev}/desired", b'{"v":1}', qos=1, retain=True
                ).wait_for_publish(5)
        # device-1 tries its own topic and someone else's.
        acks: list[bool] = []
        for topic in ("edgeship/v1/f/device-1/events", "edgeship/v1/f/device-2/events"):
            sent = d1.transport.publish(topic, b'{"v":1}', on_ack=acks.append)
            assert sent
        assert everything.wait_for(lambda m: any(x.topic.endswith("/desired") for x in m))
        deadline = time.monotonic() + 5
        while (len(acks) < 2 or not desired_seen) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # would-be forbidden deliveries get a chance to show up
        topics = [m.topic for m in everything.snapshot()]
    assert "edgeship/v1/f/device-1/events" in topics
    assert "edgeship/v1/f/device-2/events" not in topics
    assert desired_seen == ["edgeship/v1/f/device-1/desired"]
    assert acks == [True, False]  # MQTT 5: the broker answers "not authorized"
