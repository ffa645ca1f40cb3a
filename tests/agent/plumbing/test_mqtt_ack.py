"""Manual acknowledgement against a real mosquitto: what is not acknowledged comes back.

A client with ``manual_ack`` acknowledges a message only when :meth:`MqttClient.ack` is
called, on the connection the message came on; the broker redelivers the rest to the
kept session on the next connection. ``max_unacked`` bounds what the client takes in
while acknowledgements are held back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import Message, publish_many
from tests.support.broker import Broker

pytestmark = pytest.mark.integration


class Inbox:
    """Messages a handler received, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 10.0) -> list[Message]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.messages) >= n, timeout_s)
            return list(self.messages)

    def payloads(self) -> list[bytes]:
        with self._cond:
            return [m.payload for m in self.messages]


@pytest.fixture
def make(broker: Broker) -> Iterator[Callable[..., MqttClient]]:
    """Unstarted clients with quick reconnects, stopped at teardown."""
    made: list[MqttClient] = []

    def client(protocol: str = "5", **options: object) -> MqttClient:
        config = BrokerConfig(
            broker.url, protocol=protocol, backoff_initial_s=0.05, backoff_max_s=0.3
        )
        c = MqttClient(config, **options)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield client
    for c in made:
        c.stop()


def subscribed(client: MqttClient, topic_filter: str, inbox: Inbox) -> MqttClient:
    """Subscribe, connect, and return once the broker has the subscription."""
    client.subscribe(topic_filter, inbox)
    client.connect()
    # A round trip after the SUBSCRIBE: the broker handles a client's packets in order.
    publish_many(client, [("probe/none", b"")])
    return client


def send(make: Callable[..., MqttClient], messages: list[tuple[str, bytes]]) -> None:
    sender = make()
    sender.connect()
    publish_many(sender, messages)
    sender.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_only_the_unacknowledged_messages_are_redelivered_to_the_kept_session(
    make: Callable[..., MqttClient], protocol: str
) -> None:
    def collector(inbox: Inbox) -> MqttClient:
        return make(protocol, client_id="c1", session_expiry_s=600, manual_ack=True)

    first = Inbox()
    client = subscribed(collector(first), "t/#", first)
    send(make, [(f"t/{i}", b"%d" % i) for i in range(3)])
    received = first.wait_for(3)
    assert client.ack(received[0])
    client.stop()

    again = Inbox()
    subscribed(collector(again), "t/#", again)
    again.wait_for(2)
    time.sleep(0.3)  # anything more would arrive by now
    assert sorted(again.payloads()) == [b"1", b"2"]


def test_a_message_is_acknowledged_once(make: Callable[..., MqttClient]) -> None:
    inbox = Inbox()
    client = subscribed(make(manual_ack=True), "t/#", inbox)
    send(make, [("t/1", b"x")])
    (message,) = inbox.wait_for(1)
    assert client.ack(message)
    # A second PUBACK with that packet id could acknowledge the next message that reuses it.
    assert not client.ack(message)


def test_an_ack_for_a_message_of_a_lost_connection_is_refused_and_it_comes_again(
    broker: Broker, make: Callable[..., MqttClient]
) -> None:
    inbox = Inbox()
    client = subscribed(make(client_id="c1", session_expiry_s=600, manual_ack=True), "t/#", inbox)
    send(make, [("t/1", b"x")])
    (before,) = inbox.wait_for(1)
    broker.restart()  # SIGTERM: mosquitto saves the session and its unacknowledged message
    (_, after) = inbox.wait_for(2, timeout_s=20)
    assert not client.ack(before)
    assert (after.payload, after.session) == (b"x", before.session + 1)
    assert client.ack(after)


def settled(inbox: Inbox) -> list[Message]:
    """What arrived once nothing more came for 0.3 s."""
    while True:
        before = len(inbox.wait_for(0))
        time.sleep(0.3)
        now = inbox.wait_for(0)
        if len(now) == before:
            return now


@pytest.mark.parametrize(("protocol", "first"), [("5", 5), ("3.1.1", 10)])
def test_a_client_never_holds_more_than_max_unacked_and_gets_the_rest_as_it_acknowledges(
    make: Callable[..., MqttClient], protocol: str, first: int
) -> None:
    # MQTT 5: the broker is asked for 5 at a time. 3.1.1 has no such request (mosquitto
    # sends 20): the client stops reading at 10, and the broker keeps the rest queued.
    inbox = Inbox()
    client = subscribed(make(protocol, manual_ack=True, max_unacked=10), "t/#", inbox)
    send(make, [(f"t/{i}", b"%d" % i) for i in range(40)])
    assert len(settled(inbox)) == first
    acked = 0
    while acked < 40:
        held = settled(inbox)[acked:]
        # Acked oldest first, mosquitto 2.0.11 sends more than it was asked for: the
        # client reads up to max_unacked of it.
        assert 0 < len(held) <= 10
        for message in held:
            assert client.ack(message)
        acked += len(held)
    assert sorted(inbox.payloads()) == sorted(b"%d" % i for i in range(40))
    assert client.connected


def test_a_message_for_a_subscription_nobody_handles_any_more_is_acknowledged(
    make: Callable[..., MqttClient], caplog: pytest.LogCaptureFixture
) -> None:
    # A kept session still holds the subscription of an earlier run (another --fleet,
    # say): what it queued has no handler now and must not hold the window forever.
    def collector() -> MqttClient:
        return make(client_id="c1", session_expiry_s=600, manual_ack=True)

    old = Inbox()
    subscribed(collector(), "old/#", old).stop()
    send(make, [("old/1", b"x")])
    client = subscribed(collector(), "new/#", Inbox())
    deadline = time.monotonic() + 10
    while "old/1 matched no subscription" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    client.stop()
    again = Inbox()
    subscribed(collector(), "old/#", again)
    time.sleep(0.5)
    assert again.payloads() == []
