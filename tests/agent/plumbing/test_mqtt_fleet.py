"""The client's fleet-side options against a real mosquitto: acknowledged windows of
publishes, routing (shared subscriptions too), renewal after a broker restart, no
presence, and connecting for callers that must fail fast."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import BrokerError
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import Message, publish_many
from tests.support.broker import Broker, Subscriber, free_port

pytestmark = pytest.mark.integration


def keep_sending(client: MqttClient, topic: str, until: threading.Event) -> None:
    """Publish to ``topic`` until ``until`` is set: subscribing does not wait for the SUBACK."""
    deadline = time.monotonic() + 10
    while not until.wait(0.05) and time.monotonic() < deadline:
        if client.connected:
            publish_many(client, [(topic, b"x")])
    assert until.is_set()


@pytest.fixture
def clients(broker: Broker) -> Iterator[Callable[..., MqttClient]]:
    """Connected fleet-side clients (no presence), stopped at teardown."""
    made: list[MqttClient] = []

    def make(**options: object) -> MqttClient:
        client = MqttClient(
            BrokerConfig(broker.url, backoff_initial_s=0.05, backoff_max_s=0.3),
            **options,  # type: ignore[arg-type]
        )
        made.append(client)
        client.connect()
        return client

    yield make
    for client in made:
        client.stop()


def test_publish_many_returns_once_every_message_is_acknowledged(
    broker: Broker, clients: Callable[..., MqttClient]
) -> None:
    messages = [(f"edgeship/v1/f/d{i:03}/desired", b"%d" % i) for i in range(250)]
    assert publish_many(clients(), messages, retain=True, window=20) == 250
    # Retained and acknowledged: a subscriber arriving afterwards gets every one of them.
    with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
        assert sub.wait_for(lambda m: len(m) == 250)
        assert sorted((m.topic, m.payload) for m in sub.snapshot()) == messages


def test_publish_many_fails_when_the_broker_does_not_acknowledge(
    broker: Broker, clients: Callable[..., MqttClient]
) -> None:
    client = clients()
    process = broker._process  # the test broker's mosquitto (Broker has no public pid)
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)  # the broker stops answering; the connection stays open
    try:
        with pytest.raises(BrokerError, match="did not acknowledge"):
            publish_many(
                client,
                [(f"edgeship/v1/f/d{i}/desired", b"x") for i in range(30)],
                window=10,
                timeout_s=0.5,
            )
    finally:
        os.kill(process.pid, signal.SIGCONT)


def test_publish_many_refuses_an_empty_window(clients: Callable[..., MqttClient]) -> None:
    with pytest.raises(ValueError, match="window"):
        publish_many(clients(), [("edgeship/v1/f/d1/desired", b"x")], window=0)


def test_a_subscription_added_later_also_receives_topics_seen_before(
    clients: Callable[..., MqttClient],
) -> None:
    # Handlers are remembered per topic; a new subscription must not miss a known topic.
    client = clients()
    first: list[Message] = []
    second: list[Message] = []
    seen, both = threading.Event(), threading.Event()
    client.subscribe("edgeship/v1/f/+/events", lambda m: (first.append(m), seen.set()))
    assert client.publish("edgeship/v1/f/d1/events", b"1")
    assert seen.wait(10)
    client.subscribe("edgeship/v1/f/d1/#", lambda m: (second.append(m), both.set()))
    assert client.publish("edgeship/v1/f/d1/events", b"2")
    assert both.wait(10)
    assert {m.payload for m in second} == {b"2"}
    assert {m.payload for m in first} == {b"1", b"2"}


def test_a_shared_subscription_is_routed_by_its_plain_topic(
    clients: Callable[..., MqttClient],
) -> None:
    got: list[Message] = []
    done = threading.Event()
    receiver = clients()
    receiver.subscribe("$share/g/edgeship/v1/f/+/telemetry", lambda m: (got.append(m), done.set()))
    keep_sending(clients(), "edgeship/v1/f/d1/telemetry", done)
    assert got[0].topic == "edgeship/v1/f/d1/telemetry"
    assert (got[0].qos, got[0].session) == (1, receiver.session)


def test_a_failing_handler_neither_stops_the_others_nor_the_connection(
    clients: Callable[..., MqttClient],
) -> None:
    client = clients()
    got = threading.Event()

    def broken(_m: Message) -> None:
        raise RuntimeError("handler bug")

    client.subscribe("t/x", broken)
    client.subscribe("t/x", lambda _m: got.set())
    keep_sending(client, "t/x", got)
    got.clear()
    keep_sending(client, "t/x", got)
    assert (client.connected, client.session) == (True, 1)


def test_subscriptions_are_renewed_after_the_broker_restarts(
    broker: Broker, clients: Callable[..., MqttClient]
) -> None:
    receiver = clients()
    got = threading.Event()
    receiver.subscribe("edgeship/v1/f/+/state", lambda _m: got.set())
    broker.restart()  # clean sessions: the broker forgot the subscription
    sender = clients()
    deadline = time.monotonic() + 10
    while receiver.session < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    keep_sending(sender, "edgeship/v1/f/d1/state", got)
    assert receiver.session >= 2


def test_a_client_without_presence_publishes_no_status(
    broker: Broker, clients: Callable[..., MqttClient]
) -> None:
    with Subscriber(broker, "edgeship/v1/#", clean=True) as sub:
        client = clients(client_id="edgeship-f-d1")  # even with a device-like client id
        publish_many(client, [("edgeship/v1/f/d1/desired", b"{}")])
        client.stop()
        assert sub.wait_for(lambda m: len(m) == 1)
    assert [m.topic for m in sub.snapshot()] == ["edgeship/v1/f/d1/desired"]


def test_connect_fails_fast_with_a_clear_error_when_no_broker_listens() -> None:
    client = MqttClient(BrokerConfig(BrokerUrl("127.0.0.1", free_port(), tls=False)))
    with pytest.raises(BrokerError, match=r"cannot connect to the MQTT broker at mqtt://127\.0"):
        client.connect(timeout_s=10)
    assert not client.connected


def test_a_kept_session_receives_what_was_published_while_it_was_away(broker: Broker) -> None:
    config = BrokerConfig(broker.url)
    got: list[bytes] = []

    def collector() -> MqttClient:
        client = MqttClient(config, client_id="collector-1", session_expiry_s=600)
        # Before connecting: the session's queue arrives right after the CONNACK.
        client.subscribe("edgeship/v1/f/+/events", lambda m: got.append(m.payload))
        return client

    with collector() as first:
        # A round trip after the SUBSCRIBE: the broker has the subscription by now.
        publish_many(first, [("edgeship/v1/f/none/state", b"")])
    away = [("edgeship/v1/f/d1/events", json.dumps(i).encode()) for i in range(5)]
    with MqttClient(config) as sender:
        publish_many(sender, away)
    with collector():
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert sorted(got) == sorted(payload for _topic, payload in away)


def test_a_user_name_and_password_file_log_in_and_a_wrong_password_is_refused(
    broker_factory: Callable[..., Broker], tmp_path: Path
) -> None:
    broker = broker_factory(users={"fleet": "s3cr3t"})
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cr3t\n")
    bad.write_text("guess\n")
    with MqttClient(BrokerConfig(broker.url, username="fleet", password_file=good)) as client:
        assert client.connected
    refused = MqttClient(BrokerConfig(broker.url, username="fleet", password_file=bad))
    with pytest.raises(BrokerError, match=r"refused the connection: .*; check the user name"):
        refused.connect()
