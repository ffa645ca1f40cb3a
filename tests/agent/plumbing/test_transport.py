"""MqttTransport behaviour that needs no broker: backoff and the connect timeout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from agent.messages.topics import Topics
from agent.plumbing.mqtt import MqttConfig, MqttTransport, backoff_delay_s


@pytest.mark.parametrize(
    ("failures", "ceiling"), [(0, 1.0), (1, 2.0), (3, 8.0), (10, 60.0), (500, 60.0)]
)
def test_backoff_ceiling_doubles_up_to_the_maximum(failures: int, ceiling: float) -> None:
    assert backoff_delay_s(failures, 1.0, 60.0, 0.999999) == pytest.approx(ceiling, rel=1e-5)
    assert backoff_delay_s(failures, 1.0, 60.0, 0.5) == pytest.approx(ceiling / 2)


def test_backoff_never_drops_to_a_hot_loop() -> None:
    assert backoff_delay_s(0, 1.0, 60.0, 0.0) == 0.05


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never says a word (no CONNACK)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_broker_that_never_answers_is_abandoned_after_the_connect_timeout(
    silent_server: int,
) -> None:
    transport = MqttTransport(
        MqttConfig("127.0.0.1", silent_server, "f", "d1", connect_timeout_s=0.3)
    )
    transport.start()
    try:
        deadline = time.monotonic() + 10
        while transport.last_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert transport.last_error is not None
        assert "no CONNACK" in transport.last_error
        assert not transport.connected
        assert not transport.publish(Topics("f", "d1").events, b"{}")
    finally:
        transport.stop()


def test_publish_while_disconnected_is_refused_without_an_ack() -> None:
    transport = MqttTransport(MqttConfig("127.0.0.1", 1, "f", "d1"))
    acks: list[bool] = []
    assert not transport.publish("edgeship/v1/f/d1/events", b"{}", on_ack=acks.append)
    assert acks == []
