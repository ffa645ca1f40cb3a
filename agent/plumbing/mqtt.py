"""The paho-mqtt 2.x transport: MQTT 5 (or 3.1.1), TLS / mutual TLS, birth and last will.

One thread owns the connection. Each connection attempt uses a fresh paho client, so
nothing paho queued for a dead connection is ever re-sent behind the caller's back:
the outbox, not paho, decides what to send again. An attempt that has not received a
successful CONNACK within ``connect_timeout_s`` is abandoned — with TLS 1.3 a broker
that rejects the client certificate just closes the socket after the handshake, and
paho never calls ``on_connect``. Failed attempts and lost connections are retried with
exponential backoff and full jitter (so a fleet does not reconnect in lockstep after a
broker restart).

Birth and death: the last will publishes ``status`` = offline (retained) if the
connection dies; every successful connect publishes ``status`` = online (retained)
with the device attributes; :meth:`MqttTransport.stop` publishes a clean offline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.messages.topics import SCHEMA_VERSION, Topics, encode_json
from agent.plumbing.tls import TlsConfig
from agent.plumbing.transport import AckCallback, Message, MessageHandler

__all__ = ["MqttConfig", "MqttTransport", "TlsConfig", "backoff_delay_s"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int
    fleet: str
    device: str
    protocol: Literal["5", "3.1.1"] = "5"
    tls: TlsConfig | None = None
    username: str | None = None
    password: str | None = None
    client_id: str | None = None  # default "edgeship-<fleet>-<device>"
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    # paho's own window of unacknowledged QoS 1 messages. mosquitto's default receive
    # maximum is 20; paho 2.2 does not read the broker's value, so stay at or below it.
    max_inflight: int = 20
    attributes: Mapping[str, Any] = field(default_factory=dict)  # sent in the birth message


class MqttTransport:
    """:class:`agent.plumbing.transport.Transport` over paho-mqtt 2.x."""

    def __init__(self, config: MqttConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.device)
        self._clock = clock
        self._ssl = None if config.tls is None else config.tls.context()
        self._lock = threading.Lock()
        self._client: paho.Client | None = None
        self._connected = threading.Event()
        self._refused: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[int, AckCallback] = {}
        self._early: dict[int, bool] = {}
        self._listeners: list[Callable[[], None]] = []
        self._subscriptions: dict[str, tuple[MessageHandler, int]] = {}
        self.last_error: str | None = None
        self._session = 0  # successful connects so far

    # --- Transport -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def session(self) -> int:
        return self._session

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def add_connect_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions[topic_filter] = (handler, qos)
            client = self._client if self.connected else None
        if client is not None:
            self._subscribe_one(client, topic_filter, handler, qos)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: float | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        on_ack: AckCallback | None = None,
        session: int | None = None,
    ) -> bool:
        with self._lock:
            client = self._client if self.connected else None
            if session is not None and session != self._session:
                client = None
        if client is None:
            return False
        props = None
        if self.config.protocol == "5" and (expiry_s or response_topic or correlation_data):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if expiry_s:
                props.MessageExpiryInterval = max(1, math.ceil(expiry_s))
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        callback = on_ack or _ignore_ack
        with self._lock:
            if client is not self._client:
                return False  # the connection was replaced meanwhile; its acks are gone
            # paho may report the ack (always, for QoS 0) before publish() returns to us;
            # on_publish then parks it in _early. We never call into paho with our lock
            # held: paho calls on_publish with its own mutex held.
            accepted = self._early.pop(info.mid, None)
            if accepted is None:
                self._pending[info.mid] = callback
        if accepted is not None:
            callback(accepted)
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="edgeship-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publish a clean offline status (best effort), disconnect, and join the thread."""
        if self._thread is None:
            return
        if self.connected:
            done = threading.Event()
            sent = self.publish(
                self.topics.status,
                self._status_payload("offline", "shutdown"),
                retain=True,
                on_ack=lambda _ok: done.set(),
            )
            if sent:
                done.wait(min(timeout_s, 2.0))
        self._stopping.set()
        self._thread.join(timeout_s)
        self._thread = None

    # --- the connection thread -----------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            client = self._new_client()
            try:
                if self._connect(client):
                    failures = 0
                    self._serve(client)
                else:
                    failures += 1
            except Exception as e:  # noqa: BLE001 - the network thread must survive anything paho raises
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("mqtt connection error: %s", self.last_error)
                failures += 1
            finally:
                self._drop(client)
            if self._stopping.is_set():
                break
            delay = backoff_delay_s(
                failures,
                self.config.backoff_initial_s,
                self.config.backoff_max_s,
                random.random(),  # noqa: S311 - jitter, not crypto
            )
            self._stopping.wait(delay)

    def _connect(self, client: paho.Client) -> bool:
        cfg = self.config
        try:
            if cfg.protocol == "5":
                client.connect(cfg.host, cfg.port, cfg.keepalive_s, clean_start=True)
            else:
                client.connect(cfg.host, cfg.port, cfg.keepalive_s)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            self.last_error = f"connect to {cfg.host}:{cfg.port} failed: {e}"
            log.info("%s", self.last_error)
            return False
        deadline = time.monotonic() + cfg.connect_timeout_s
        while time.monotonic() < deadline and not self._stopping.is_set():
            rc = client.loop(timeout=0.05)
            if self.connected:
                return True
            if self._refused is not None:
                self.last_error = f"broker refused the connection: {self._refused}"
                log.warning("%s", self.last_error)
                return False
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.last_error = (
                    f"connection to {cfg.host}:{cfg.port} closed before CONNACK ({rc.name});"
                    " check the client certificate and the broker's TLS settings"
                )
                log.warning("%s", self.last_error)
                return False
        if not self._stopping.is_set():
            self.last_error = (
                f"no CONNACK from {cfg.host}:{cfg.port} within {cfg.connect_timeout_s}s"
            )
            log.warning("%s", self.last_error)
        return False

    def _serve(self, client: paho.Client) -> None:
        while not self._stopping.is_set() and self.connected:
            rc = client.loop(timeout=0.05)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.last_error = f"connection lost ({rc.name})"
                log.info("mqtt %s", self.last_error)
                return
        if self._stopping.is_set():
            client.disconnect()
            # Flush the DISCONNECT so the broker does not publish the last will.
            for _ in range(5):
                if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break

    def _new_client(self) -> paho.Client:
        cfg = self.config
        protocol = paho.MQTTv5 if cfg.protocol == "5" else paho.MQTTv311
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"edgeship-{cfg.fleet}-{cfg.device}",
            protocol=protocol,
            # 3.1.1: no broker-side session; the outbox is the session.
            clean_session=None if protocol == paho.MQTTv5 else True,
        )
        client.connect_timeout = cfg.connect_timeout_s
        client.max_inflight_messages_set(cfg.max_inflight)
        if self._ssl is not None:
            client.tls_set_context(self._ssl)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.will_set(
            self.topics.status,
            self._status_payload("offline", "connection-lost"),
            qos=1,
            retain=True,
        )
        self._refused = None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = _no_delay
        with self._lock:
            self._client = client
            self._pending.clear()
            self._early.clear()
        return client

    def _drop(self, client: paho.Client) -> None:
        self._connected.clear()
        with self._lock:
            if self._client is client:
                self._client = None
            self._pending.clear()
            self._early.clear()
        try:
            sock = client.socket()
            if sock is not None:
                sock.close()
        except OSError:
            pass

    # --- paho callbacks (on the connection thread) ---------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            return
        with self._lock:
            self._session += 1
        self.last_error = None
        self._connected.set()
        self.publish(self.topics.status, self._status_payload("online", None), retain=True)
        with self._lock:
            subscriptions = dict(self._subscriptions)
        for topic_filter, (handler, qos) in subscriptions.items():
            self._subscribe_one(client, topic_filter, handler, qos)
        for listener in list(self._listeners):
            listener()

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if self.connected and reason.is_failure:
            self.last_error = f"disconnected: {reason}"
        self._connected.clear()

    def _on_publish(
        self,
        _client: paho.Client,
        _userdata: object,
        mid: int,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        accepted = not reason.is_failure
        if not accepted:
            log.warning("broker refused a publish: %s", reason)
        with self._lock:
            callback = self._pending.pop(mid, None)
            if callback is None:
                self._early[mid] = accepted
        if callback is not None:
            callback(accepted)

    def _subscribe_one(
        self, client: paho.Client, topic_filter: str, handler: MessageHandler, qos: int
    ) -> None:
        def deliver(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
            props = getattr(msg, "properties", None)
            handler(
                Message(
                    topic=msg.topic,
                    payload=bytes(msg.payload),
                    retain=bool(msg.retain),
                    response_topic=getattr(props, "ResponseTopic", None),
                    correlation_data=getattr(props, "CorrelationData", None),
                )
            )

        client.message_callback_add(topic_filter, deliver)
        client.subscribe(topic_filter, qos=qos)

    def _status_payload(self, status: str, reason: str | None) -> bytes:
        body: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "fleet": self.config.fleet,
            "device": self.config.device,
            "ts": round(self._clock(), 3),
            "status": status,
        }
        if reason is not None:
            body["reason"] = reason
        if status == "online":
            body["attributes"] = dict(self.config.attributes)
        return encode_json(body)


def backoff_delay_s(failures: int, initial_s: float, max_s: float, u: float) -> float:
    """Wait before the next connection attempt: full jitter over an exponential ceiling.

    ``failures`` attempts failed in a row; ``u`` is uniform in [0, 1). The ceiling doubles
    from ``initial_s`` up to ``max_s``; the wait is never under 50 ms (no hot loop).
    """
    ceiling = min(max_s, initial_s * 2.0 ** min(failures, 32))
    return max(0.05, u * ceiling)


def _ignore_ack(_accepted: bool) -> None:
    """Acks of messages nobody waits for (birth, retained state)."""


def _no_delay(_client: paho.Client, _userdata: object, sock: object) -> None:
    """Turn Nagle's algorithm off: telemetry and inference replies are small messages,
    and holding each back for the previous one's ACK cost a 40 ms delayed-ACK stall per
    request in bench/serving.py."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is not None:
        with contextlib.suppress(OSError):
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
