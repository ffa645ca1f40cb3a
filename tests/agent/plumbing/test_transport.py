"""What needs no broker: the connect timeout, failing fast, and publish_many's rules
against a recording transport."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.errors import BrokerError
from agent.messages.status import device_presence
from agent.messages.topics import Topics
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import AckCallback, MessageHandler, publish_many


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
            except socket.timeout:  # TimeoutError from Python 3.10 on
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def client_for(port: int, **settings: float) -> MqttClient:
    config = BrokerConfig(BrokerUrl("127.0.0.1", port, tls=False), **settings)  # type: ignore[arg-type]
    return MqttClient(config, presence=device_presence(Topics("f", "d1")))


def test_a_broker_that_never_answers_is_abandoned_after_the_connect_timeout(
    silent_server: int,
) -> None:
    client = client_for(silent_server, connect_timeout_s=0.3)
    client.start()
    try:
        deadline = time.monotonic() + 10
        while client.last_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.last_error is not None
        assert "no CONNACK" in client.last_error
        assert not client.connected
        assert not client.publish(Topics("f", "d1").events, b"{}")
    finally:
        client.stop()


def test_connect_gives_up_after_the_first_failed_attempt_saying_why(silent_server: int) -> None:
    client = client_for(silent_server, connect_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"mqtt://127\.0\.0\.1:\d+: no CONNACK .* within 0\.3s"):
        client.connect()
    assert time.monotonic() - started < 5
    assert client.session == 0


def test_publish_while_disconnected_is_refused_without_an_ack() -> None:
    acks: list[bool] = []
    assert not client_for(1).publish("edgeship/v1/f/d1/events", b"{}", on_ack=acks.append)
    assert acks == []


def test_a_kept_session_needs_a_client_id() -> None:
    with pytest.raises(ValueError, match="client_id"):
        MqttClient(BrokerConfig(BrokerUrl("127.0.0.1", 1, tls=False)), session_expiry_s=60)


class Recorder:
    """A Transport that records publishes and acknowledges them as told."""

    def __init__(self, answer: Callable[[int, AckCallback], None]) -> None:
        self.answer = answer
        self.sent: list[str] = []
        self.connected = True
        self.session = 1

    def publish(self, topic: str, payload: bytes, **kw: object) -> bool:
        if not self.connected or kw.get("session") != self.session:
            return False
        self.sent.append(topic)
        on_ack = kw["on_ack"]
        assert callable(on_ack)
        self.answer(len(self.sent), on_ack)
        return True

    def add_connect_listener(self, listener: Callable[[], None]) -> None: ...

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def messages(n: int) -> list[tuple[str, bytes]]:
    return [(f"t/{i}", b"x") for i in range(n)]


def test_publish_many_keeps_at_most_a_window_unacknowledged() -> None:
    lock = threading.Lock()
    unacked: list[AckCallback] = []
    most = 0

    def hold(_n: int, on_ack: AckCallback) -> None:
        nonlocal most
        with lock:
            unacked.append(on_ack)
            most = max(most, len(unacked))

    done = threading.Event()

    def slow_broker() -> None:
        while not done.wait(0.005):
            with lock:
                ack = unacked.pop(0) if unacked else None
            if ack is not None:
                ack(True)

    broker = threading.Thread(target=slow_broker)
    broker.start()
    recorder = Recorder(hold)
    try:
        assert publish_many(recorder, messages(30), window=3, timeout_s=5) == 30
    finally:
        done.set()
        broker.join()
    assert most == 3
    assert recorder.sent == [t for t, _ in messages(30)]


def test_publish_many_names_a_refused_publish() -> None:
    recorder = Recorder(lambda n, ack: ack(n != 4))
    with pytest.raises(BrokerError, match=r"refused the publish to t/3; check its ACL"):
        publish_many(recorder, messages(10))


def test_publish_many_stops_when_the_connection_is_lost() -> None:
    recorder = Recorder(lambda _n, _ack: None)  # never acknowledged
    threading.Timer(0.2, lambda: setattr(recorder, "session", 2)).start()
    started = time.monotonic()
    with pytest.raises(BrokerError, match="connection to the broker was lost"):
        publish_many(recorder, messages(3), timeout_s=30)
    assert time.monotonic() - started < 5


def test_publish_many_needs_a_connection() -> None:
    recorder = Recorder(lambda _n, ack: ack(True))
    recorder.connected = False
    with pytest.raises(BrokerError, match="not connected"):
        publish_many(recorder, messages(1))
