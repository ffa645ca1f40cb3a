"""The fleet side's MQTT client: publishes desired state, reads status, state and events.

It does not reuse :class:`agent.plumbing.mqtt.MqttTransport`, on purpose: that transport
is a *device* connection — it announces a birth and a last will on a device's ``status``
topic, so a collector or the CLI would show up as a device of the fleet — and its
message dispatch cannot route MQTT 5 shared subscriptions (``$share/<group>/...``), whose
messages arrive under the plain topic. Configuration (:class:`TlsConfig`) and the
received-message type are shared with the agent.
"""

from __future__ import annotations

import collections
import logging
import threading
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import BrokerError, ConfigError
from agent.plumbing.tls import TlsConfig
from agent.plumbing.transport import Message, MessageHandler

__all__ = ["BrokerUrl", "FleetClient", "parse_broker_url", "plain_filter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerUrl:
    """``mqtt://[user[:password]@]host[:port]`` (default 1883) or ``mqtts://`` (8883).

    Raises:
        ConfigError: another scheme, or no host.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
        raise ConfigError(f"broker URL {url!r} must look like mqtt://host:1883 or mqtts://host")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"broker URL {url!r} has an invalid port") from None
    return BrokerUrl(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password else None,
    )


def plain_filter(topic_filter: str) -> str:
    """The filter messages of ``topic_filter`` match: ``$share/<group>/`` stripped."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class FleetClient:
    """One MQTT 5 connection with blocking connect and acknowledged publishes.

    Handlers run on paho's network thread and must not block. Subscriptions are renewed
    after a reconnect. ``session_expiry_s`` > 0 with a fixed ``client_id`` keeps the
    broker-side session (and the QoS 1 messages queued for it) across short outages.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str = "",
        tls: TlsConfig | None = None,
        session_expiry_s: int = 0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.broker = parse_broker_url(url)
        self._timeout_s = connect_timeout_s
        self._session_expiry_s = session_expiry_s
        self._subscriptions: list[tuple[str, str, MessageHandler, int]] = []
        self._routes: dict[str, tuple[MessageHandler, ...]] = {}  # topic -> its handlers
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self._client.reconnect_delay_set(1, 30)
        if self.broker.tls or tls is not None:
            self._client.tls_set_context((tls or TlsConfig()).context())
        if self.broker.username is not None:
            self._client.username_pw_set(self.broker.username, self.broker.password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._started = False

    def connect(self) -> None:
        """Connect and wait for the CONNACK.

        Raises:
            BrokerError: unreachable, refused, or no CONNACK within the timeout.
        """
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        b = self.broker
        try:
            self._client.connect(
                b.host, b.port, 30, clean_start=self._session_expiry_s == 0, properties=props
            )
        except (OSError, ValueError) as e:
            raise BrokerError(
                f"cannot connect to the broker at {b.host}:{b.port}: {e}; is it running?"
            ) from None
        self._client.loop_start()
        self._started = True
        if not self._connected.wait(self._timeout_s):
            reason = self._refused or f"no CONNACK within {self._timeout_s}s"
            self.close()
            raise BrokerError(
                f"broker {b.host}:{b.port} did not accept the connection ({reason});"
                " check the URL, credentials and TLS settings"
            )

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1) -> None:
        """Deliver messages matching ``topic_filter`` (shared subscriptions too) to ``handler``."""
        with self._lock:
            self._subscriptions.append((topic_filter, plain_filter(topic_filter), handler, qos))
            self._routes.clear()
        if self.connected:
            self._client.subscribe(topic_filter, qos=qos)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout_s: float = 10.0
    ) -> None:
        """Publish with QoS 1 and wait for the broker's acknowledgement.

        Raises:
            BrokerError: not acknowledged in time, or refused.
        """
        self.publish_many([(topic, payload)], retain=retain, window=1, timeout_s=timeout_s)

    def publish_many(
        self,
        messages: Iterable[tuple[str, bytes]],
        *,
        retain: bool = False,
        window: int = 20,
        timeout_s: float = 10.0,
    ) -> int:
        """Publish with QoS 1, up to ``window`` unacknowledged at once; return when all are.

        Waiting for each acknowledgement before the next publish costs a round trip per
        message; a window keeps the connection busy while bounding what is in flight.
        Every publish is still confirmed before this returns. The default, 20, is paho's
        in-flight limit (and mosquitto's default receive maximum): paho queues anything
        beyond it, and its queue bookkeeping is linear in the queue's length, so a larger
        window is slower, not faster (measured: ~100 µs per publish at 20, ~160 at 100).

        Returns:
            How many messages were published (and acknowledged).

        Raises:
            BrokerError: a publish was refused, or not acknowledged within ``timeout_s`` of
                becoming the oldest unacknowledged one.
            ValueError: ``window`` < 1.
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        pending: collections.deque[tuple[str, paho.MQTTMessageInfo]] = collections.deque()
        count = 0
        for topic, payload in messages:
            while len(pending) >= window:
                self._acknowledged(*pending.popleft(), timeout_s)
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise BrokerError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
            pending.append((topic, info))
            count += 1
        while pending:
            self._acknowledged(*pending.popleft(), timeout_s)
        return count

    @staticmethod
    def _acknowledged(topic: str, info: paho.MQTTMessageInfo, timeout_s: float) -> None:
        """Wait for one publish's acknowledgement. Raises: BrokerError when it does not come."""
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as e:
            raise BrokerError(f"publish to {topic} failed: {e}") from None
        if not info.is_published():
            raise BrokerError(f"the broker did not acknowledge {topic} within {timeout_s}s")

    def close(self) -> None:
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False
        self._connected.clear()

    def __enter__(self) -> FleetClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- paho callbacks (network thread) -----------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _props: object,
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            return
        with self._lock:
            subscriptions = list(self._subscriptions)
        for topic_filter, _plain, _handler, qos in subscriptions:
            client.subscribe(topic_filter, qos=qos)
        self._connected.set()

    def _on_disconnect(self, *_args: object) -> None:
        self._connected.clear()

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        message = Message(topic=topic, payload=bytes(msg.payload), retain=bool(msg.retain))
        handlers = self._routes.get(topic)
        if handlers is None:
            handlers = self._route(topic)
        if not handlers:
            # paho has acknowledged it already; it can only be reported.
            log.warning("message on %s matched no subscription and was dropped", topic)
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                log.exception("handler for %s failed", msg.topic)

    def _route(self, topic: str) -> tuple[MessageHandler, ...]:
        """The handlers of ``topic``, remembered for its next message.

        Matching a topic against every filter with paho's matcher costs ~5 µs per filter:
        a sixth of a collector's network thread, which is what limits its ingest.
        """
        with self._lock:
            handlers = tuple(
                h for _f, plain, h, _q in self._subscriptions if _matches(plain, topic)
            )
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()
            self._routes[topic] = handlers
        return handlers


# Topics whose handlers are remembered (one per device and message kind); beyond that the
# memory starts over, so a fleet of any size costs at most this many entries.
_MAX_ROUTES = 100_000


def _matches(topic_filter: str, topic: str) -> bool:
    return bool(paho.topic_matches_sub(topic_filter, topic))
