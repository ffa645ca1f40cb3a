"""The fleet side's MQTT client against a real mosquitto: pipelined publishes, routing."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from agent.errors import BrokerError
from agent.plumbing.transport import Message
from sdk.fleet._client import FleetClient
from tests.support.broker import Broker, Subscriber

pytestmark = pytest.mark.integration


def connected(broker: Broker) -> FleetClient:
    client = FleetClient(f"mqtt://{broker.host}:{broker.port}")
    client.connect()
    return client


def test_publish_many_returns_once_every_message_is_acknowledged(broker: Broker) -> None:
    messages = [(f"edgeship/v1/f/d{i:03}/desired", b"%d" % i) for i in range(250)]
    client = connected(broker)
    try:
        assert client.publish_many(messages, retain=True, window=20) == 250
    finally:
        client.close()
    # Retained and acknowledged: a subscriber arriving afterwards gets every one of them.
    with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
        assert sub.wait_for(lambda m: len(m) == 250)
        assert sorted((m.topic, m.payload) for m in sub.snapshot()) == messages


def test_publish_many_fails_when_the_broker_does_not_acknowledge(broker: Broker) -> None:
    client = connected(broker)
    process = broker._process  # the test broker's mosquitto (Broker has no public pid)
    assert process is not None
    pid = process.pid
    os.kill(pid, signal.SIGSTOP)  # the broker stops answering; the connection stays open
    try:
        with pytest.raises(BrokerError, match="did not acknowledge"):
            client.publish_many(
                [(f"edgeship/v1/f/d{i}/desired", b"x") for i in range(30)],
                window=10,
                timeout_s=0.5,
            )
    finally:
        os.kill(pid, signal.SIGCONT)
        client.close()


def test_publish_many_refuses_an_empty_window(broker: Broker) -> None:
    client = connected(broker)
    try:
        with pytest.raises(ValueError, match="window"):
            client.publish_many([("edgeship/v1/f/d1/desired", b"x")], window=0)
    finally:
        client.close()


def test_a_subscription_added_later_also_receives_topics_seen_before(broker: Broker) -> None:
    # Handlers are remembered per topic; a new subscription must not miss a known topic.
    client = connected(broker)
    first: list[Message] = []
    second: list[Message] = []
    seen, both = threading.Event(), threading.Event()
    try:
        client.subscribe("edgeship/v1/f/+/events", lambda m: (first.append(m), seen.set()))
        client.publish("edgeship/v1/f/d1/events", b"1")
        assert seen.wait(10)
        client.subscribe("edgeship/v1/f/d1/#", lambda m: (second.append(m), both.set()))
        client.publish("edgeship/v1/f/d1/events", b"2")
        assert both.wait(10)
    finally:
        client.close()
    assert {m.payload for m in second} == {b"2"}
    assert {m.payload for m in first} == {b"1", b"2"}
