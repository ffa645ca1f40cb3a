"""One paho client per connection attempt: its options, CONNECT properties and socket hooks.

:class:`agent.plumbing.mqtt.MqttClient` owns the connection and its callbacks; what a
fresh paho client is made of lives here, so that the client reads as the connection's
life (connect, serve, drop) and not as paho's settings.
"""

from __future__ import annotations

import contextlib
import math
import socket
from ssl import SSLContext

from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.plumbing._paho_client import paho
from agent.plumbing.broker import BrokerConfig
from agent.plumbing.transport import PUBLISH_WINDOW, Message

__all__ = [
    "connect_properties",
    "loop_without_reading",
    "new_paho_client",
    "publish_properties",
    "quick_ack",
    "received",
]

# paho's own window of unacknowledged QoS 1 messages. mosquitto's default receive
# maximum is 20; paho 2.2 does not read the broker's value, so stay at or below it.
_MAX_INFLIGHT = PUBLISH_WINDOW


def new_paho_client(
    config: BrokerConfig,
    *,
    client_id: str,
    keep_session: bool,
    manual_ack: bool,
    tcp_nodelay: bool,
    ssl: SSLContext | None,
    password: str | None,
    will: tuple[str, bytes] | None,
) -> paho.Client:
    """A paho client for one connection attempt: all but the callbacks.

    ``will`` is the last will's topic and payload (retained, QoS 1).
    """
    protocol = paho.MQTTv5 if config.protocol == "5" else paho.MQTTv311
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        # 3.1.1 without a kept session: no broker-side state; the caller is the session.
        clean_session=None if protocol == paho.MQTTv5 else not keep_session,
        manual_ack=manual_ack,
    )
    client.connect_timeout = config.connect_timeout_s
    client.max_inflight_messages_set(_MAX_INFLIGHT)
    if ssl is not None:
        client.tls_set_context(ssl)
    if config.username is not None:
        client.username_pw_set(config.username, password)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.on_socket_register_write = _written_by_the_loop
    if tcp_nodelay:
        client.on_socket_open = _no_delay
    return client


def connect_properties(session_expiry_s: int, receive_maximum: int | None) -> Properties | None:
    """The MQTT 5 CONNECT properties: a kept session, and how many unacknowledged
    messages the broker may send at once."""
    if not session_expiry_s and receive_maximum is None:
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def publish_properties(
    expiry_s: float | None, response_topic: str | None, correlation_data: bytes | None
) -> Properties | None:
    """The MQTT 5 PUBLISH properties: message expiry, and request/response fields."""
    if not (expiry_s or response_topic or correlation_data):
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if expiry_s:
        props.MessageExpiryInterval = max(1, math.ceil(expiry_s))
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation_data:
        props.CorrelationData = correlation_data
    return props


def received(msg: paho.MQTTMessage, session: int) -> Message:
    """paho's message as the transport's, numbered with the connection it came on."""
    props = getattr(msg, "properties", None)
    return Message(
        topic=msg.topic,
        payload=bytes(msg.payload),
        retain=bool(msg.retain),
        response_topic=getattr(props, "ResponseTopic", None),
        correlation_data=getattr(props, "CorrelationData", None),
        qos=msg.qos,
        mid=msg.mid,
        session=session,
    )


def loop_without_reading(client: paho.Client) -> MQTTErrorCode:
    """One turn of the connection that reads nothing: write what is queued, keep alive."""
    rc = client.loop_write() if client.want_write() else MQTTErrorCode.MQTT_ERR_SUCCESS
    return client.loop_misc() if rc == MQTTErrorCode.MQTT_ERR_SUCCESS else rc


def quick_ack(client: paho.Client) -> None:
    """Have the kernel acknowledge what was read at once (Linux TCP_QUICKACK, which lapses).

    A receiver that sends its PUBACKs only once the messages are stored writes nothing
    for a while, so its TCP acknowledgements are delayed; a broker with Nagle's algorithm
    on (mosquitto's default) then holds each next message back until one comes: ~8 ms
    more per message for a collector acknowledging every 20 ms (0.3 ms with this).
    """
    setsockopt = getattr(client.socket(), "setsockopt", None)
    option = getattr(socket, "TCP_QUICKACK", None)
    if setsockopt is not None and option is not None:
        with contextlib.suppress(OSError):
            setsockopt(socket.IPPROTO_TCP, option, 1)


def _written_by_the_loop(_client: paho.Client, _userdata: object, _sock: object) -> None:
    """Leave every socket write to the connection thread (paho's socket pair wakes it).

    Without this hook paho writes a publish in the caller's thread, holding its message
    lock across the system call, which stalls the thread handling acknowledgements: a
    window of publishes went ~25 % slower, while reply latency did not improve."""


def _no_delay(_client: paho.Client, _userdata: object, sock: object) -> None:
    """Turn Nagle's algorithm off: telemetry and inference replies are small messages,
    and holding each back for the previous one's ACK cost a 40 ms delayed-ACK stall per
    request in bench/serving.py."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is not None:
        with contextlib.suppress(OSError):
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
