"""The MQTT client of the device and of the fleet side: paho-mqtt 2.x, MQTT 5 or 3.1.1.

One thread owns the connection. Each connection attempt uses a fresh paho client, so
nothing paho queued for a dead connection is ever re-sent behind the caller's back: the
caller (the device's durable outbox, the fleet's :func:`~agent.plumbing.transport.
publish_many`) decides what to send again. An attempt that has not received a
successful CONNACK within ``connect_timeout_s`` is abandoned — with TLS 1.3 a broker
that rejects the client certificate just closes the socket after the handshake, and
paho never calls ``on_connect``. Failed attempts and lost connections are retried after
a :class:`~agent.plumbing.backoff.Backoff` with full jitter (a fleet does not reconnect
in lockstep after a broker restart), and every subscription is renewed on every
connection.

What differs between a device and the fleet side are options of this one client:

* ``presence``: a device announces itself on a retained topic. Every successful connect
  publishes the ``online`` document (birth), the last will publishes ``offline`` if the
  connection dies, and :meth:`MqttClient.stop` publishes a clean ``offline``. The
  documents are the caller's (a device's: :func:`agent.messages.status.device_presence`).
  Without it (collector, CLI) the client is no device.
* ``session_expiry_s`` with a fixed ``client_id``: the broker keeps the session, and the
  QoS 1 messages queued for it, across short outages (the collector). Without, every
  connection starts clean: the device's outbox is its session.
* Shared subscriptions (``$share/<group>/<filter>``) deliver under the plain topic:
  every message is routed by its topic through one table of topic -> handlers.
* ``manual_ack``: a received message is acknowledged only by :meth:`MqttClient.ack`
  (the collector's, once its row is committed), on the connection it came on; the broker
  redelivers what was not to a kept session. ``max_unacked`` bounds what it holds: an
  MQTT 5 broker is asked for half as many (Receive Maximum), and the client stops reading
  at ``max_unacked`` (brokers that send more, 3.1.1): the broker queues the rest.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import BrokerError
from agent.plumbing._paho import (
    connect_properties,
    loop_without_reading,
    new_paho_client,
    publish_properties,
    quick_ack,
    received,
)
from agent.plumbing._paho_client import paho
from agent.plumbing._routes import Routes
from agent.plumbing.backoff import Backoff
from agent.plumbing.broker import BrokerConfig
from agent.plumbing.tls import TlsConfig  # still importable from here (CHANGELOG)
from agent.plumbing.transport import AckCallback, Message, MessageHandler

__all__ = ["MqttClient", "Presence", "TlsConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Presence:
    """A client that announces itself: under ``client_id``, retained on ``topic``.

    ``document(status, reason)`` makes the payload: ``("online", None)`` on every connect,
    ``("offline", "connection-lost")`` as the last will (made when the connection is),
    ``("offline", "shutdown")`` at a clean stop.
    """

    client_id: str
    topic: str
    document: Callable[[str, str | None], bytes]


class MqttClient:
    """:class:`~agent.plumbing.transport.Transport` over paho-mqtt 2.x. Thread-safe.

    ``client_id`` defaults to the ``presence``'s, else to one the broker assigns. Use as a
    context manager (:meth:`connect`, :meth:`stop`), or call :meth:`start` and :meth:`stop`.

    ``tcp_nodelay`` (default on) sends every small message at once: a device answering
    requests must not hold one back for the previous one's ACK. A client that mostly
    receives (the collector) turns it off so the kernel coalesces its PUBACKs: draining a
    backlog, that halved the broker's CPU per message and ran ~20 % faster.

    Raises (constructor):
        ConfigError: the TLS files or the password file are unusable.
        ValueError: ``session_expiry_s`` is negative, or set without a ``client_id``;
            ``max_unacked`` is outside 1..65535 or set without ``manual_ack``.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        presence: Presence | None = None,
        client_id: str | None = None,
        session_expiry_s: int = 0,
        tcp_nodelay: bool = True,
        manual_ack: bool = False,
        max_unacked: int | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if client_id is None and presence is not None:
            client_id = presence.client_id
        if session_expiry_s < 0 or (session_expiry_s and not client_id):
            raise ValueError("session_expiry_s must be >= 0, and a kept session needs a client_id")
        if max_unacked is not None and not (manual_ack and 1 <= max_unacked <= 65535):
            raise ValueError(f"max_unacked needs manual_ack and 1..65535, not {max_unacked}")
        self.config = config
        self.presence = presence
        self.client_id = client_id or ""
        self.session_expiry_s = session_expiry_s
        self.tcp_nodelay = tcp_nodelay
        self.manual_ack = manual_ack
        self.max_unacked = max_unacked
        self._rand = rand
        self._password = config.password()
        self._ssl = config.ssl_context()
        self._lock = threading.Lock()
        self._client: paho.Client | None = None
        self._connected = threading.Event()
        self._attempts = threading.Condition()  # notified after every attempt
        self._failures = 0  # failed attempts so far
        self._refused: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[int, AckCallback] = {}
        self._early: dict[int, bool] = {}
        # Unacknowledged (manual_ack) by packet id: the broker reuses one only once acked.
        self._delivered: dict[int, Message] = {}
        self._acked = threading.Event()  # set by ack(): reading may go on
        self._listeners: list[Callable[[], None]] = []
        self._routes = Routes()
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
        self._routes.add(topic_filter, handler, qos)
        with self._lock:
            client = self._client if self.connected else None
        if client is not None:
            client.subscribe(topic_filter, qos=qos)

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
        if self.config.protocol == "5":
            props = publish_properties(expiry_s, response_topic, correlation_data)
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        callback = on_ack or _ignore_ack
        with self._lock:
            if client is not self._client:
                return False  # the connection was replaced meanwhile; its acks are gone
            # The connection thread may write the message and report its ack before
            # publish() returns to us; on_publish then parks it in _early. We never call
            # into paho with our lock held: paho calls on_publish with its own mutex held.
            accepted = self._early.pop(info.mid, None)
            if accepted is None:
                self._pending[info.mid] = callback
        if accepted is not None:
            callback(accepted)
        return True

    def ack(self, message: Message) -> bool:
        """Acknowledge a message received with ``manual_ack``, on the connection it came on.

        False when that connection is gone (a kept session gets the message again) or the
        message was acknowledged already: a packet id is never acknowledged twice. Without
        ``manual_ack``, and for QoS 0, paho has done it: True.
        """
        if not self.manual_ack or message.qos == 0:
            return True
        with self._lock:
            client = self._client
            if client is None or self._delivered.get(message.mid) is not message:
                return False
            del self._delivered[message.mid]
        # Outside our lock (see publish); the connection thread writes the packet.
        client.ack(message.mid, message.qos)
        self._acked.set()
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="edgeship-mqtt", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publish a clean offline status (with presence; best effort), disconnect, join."""
        if self._thread is None:
            return
        if self.presence is not None and self.connected:
            done = threading.Event()
            sent = self.publish(
                self.presence.topic,
                self.presence.document("offline", "shutdown"),
                retain=True,
                on_ack=lambda _ok: done.set(),
            )
            if sent:
                done.wait(min(timeout_s, 2.0))
        self._stopping.set()
        self._thread.join(timeout_s)
        self._thread = None

    # --- for callers that must fail fast ---------------------------------------------

    def connect(self, timeout_s: float | None = None) -> None:
        """Start, and wait for a connection; give up (and stop) after the first failed attempt.

        ``timeout_s`` defaults to the connect timeout plus a second for the handshakes.
        Once connected, the client reconnects by itself as always.

        Raises:
            BrokerError: no connection; the message says why and what to check.
        """
        wait_s = self.config.connect_timeout_s + 1.0 if timeout_s is None else timeout_s
        with self._attempts:
            failures = self._failures
        self.start()
        with self._attempts:
            self._attempts.wait_for(lambda: self.connected or self._failures > failures, wait_s)
        if self.connected:
            return
        reason = self.last_error or f"no connection within {wait_s}s"
        self.stop()
        raise BrokerError(f"cannot connect to the MQTT broker at {self.config.url}: {reason}")

    def __enter__(self) -> MqttClient:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- the connection thread -----------------------------------------------------

    def _run(self) -> None:
        cfg = self.config
        backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s, rand=self._rand)
        while not self._stopping.is_set():
            client = self._new_client()
            try:
                if self._connect(client):
                    backoff.reset()
                    self._serve(client)
                else:
                    self._attempt_failed()
            except Exception as e:  # noqa: BLE001 - the network thread must survive anything paho raises
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("mqtt connection error: %s", self.last_error)
                self._attempt_failed()
            finally:
                self._drop(client)
            if self._stopping.is_set():
                break
            self._stopping.wait(backoff.next())

    def _attempt_failed(self) -> None:
        with self._attempts:
            self._failures += 1
            self._attempts.notify_all()

    def _connect(self, client: paho.Client) -> bool:
        cfg, url = self.config, self.config.url
        deadline = time.monotonic() + cfg.connect_timeout_s
        try:
            if cfg.protocol == "3.1.1":
                client.connect(url.host, url.port, cfg.keepalive_s)
            else:
                window = None if self.max_unacked is None else max(1, self.max_unacked // 2)
                props = connect_properties(self.session_expiry_s, window)
                client.connect(
                    url.host,
                    url.port,
                    cfg.keepalive_s,
                    clean_start=not self.session_expiry_s,
                    properties=props,
                )
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            self.last_error = (
                f"cannot reach {url}: {e}; check the URL, that the broker runs there,"
                " and the TLS settings"
            )
            log.warning("%s", self.last_error)
            return False
        while time.monotonic() < deadline and not self._stopping.is_set():
            rc = client.loop(timeout=0.05)
            if self.connected:
                return True
            if self._refused is not None:
                self.last_error = (
                    f"the broker refused the connection: {self._refused};"
                    " check the user name, password file and client certificate"
                )
                log.warning("%s", self.last_error)
                return False
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.last_error = (
                    f"connection to {url} closed before CONNACK ({rc.name});"
                    " check the client certificate and the broker's TLS settings"
                )
                log.warning("%s", self.last_error)
                return False
        if not self._stopping.is_set():
            self.last_error = (
                f"no CONNACK from {url} within {cfg.connect_timeout_s}s;"
                " check that an MQTT broker listens on that port"
            )
            log.warning("%s", self.last_error)
        return False

    def _serve(self, client: paho.Client) -> None:
        while not self._stopping.is_set() and self.connected:
            if self.max_unacked is None or len(self._delivered) < self.max_unacked:
                rc = client.loop(timeout=0.05)
            else:
                # Read no more, so that the broker keeps the rest: it may send more than
                # the Receive Maximum once acks come (mosquitto 2.0.11 does).
                rc = loop_without_reading(client)
                self._acked.wait(0.05)
                self._acked.clear()
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
        client = new_paho_client(
            cfg,
            client_id=self.client_id,
            keep_session=bool(self.session_expiry_s),
            manual_ack=self.manual_ack,
            tcp_nodelay=self.tcp_nodelay,
            ssl=self._ssl,
            password=self._password,
            will=None
            if self.presence is None
            else (self.presence.topic, self.presence.document("offline", "connection-lost")),
        )
        self._refused = None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._forget_connection(client)
        return client

    def _drop(self, client: paho.Client) -> None:
        self._connected.clear()
        self._forget_connection(None, client)
        try:
            sock = client.socket()
            if sock is not None:
                sock.close()
        except OSError:
            pass

    def _forget_connection(self, new: paho.Client | None, old: paho.Client | None = None) -> None:
        """Publishes and deliveries of the last connection are gone with it."""
        with self._lock:
            if old is None or self._client is old:
                self._client = new
            self._pending.clear()
            self._early.clear()
            self._delivered.clear()

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
        if self.presence is not None:
            self.publish(self.presence.topic, self.presence.document("online", None), retain=True)
        for topic_filter, qos in self._routes.filters().items():
            client.subscribe(topic_filter, qos=qos)
        for listener in list(self._listeners):
            listener()
        # Last: what a waiting connect() caller publishes next goes out after these.
        with self._attempts:
            self._attempts.notify_all()

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

    def _on_message(self, client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        message = received(msg, self._session)
        handlers = self._routes.handlers(topic)
        if not handlers:
            # Acknowledged (by paho, or here: nobody else will), so it can only be reported.
            log.warning("message on %s matched no subscription and was dropped", topic)
            if self.manual_ack and msg.qos:
                client.ack(msg.mid, msg.qos)
        elif self.manual_ack and msg.qos:
            with self._lock:
                self._delivered[msg.mid] = message
            quick_ack(client)
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                log.exception("handler for %s failed", topic)


def _ignore_ack(_accepted: bool) -> None:
    """Acks of messages nobody waits for (birth, retained state)."""
