"""The small interface the telemetry reporter (and MQTT serving) publish through.

:class:`agent.plumbing.mqtt.MqttTransport` implements it over paho-mqtt; tests and
users can plug in another one (a different client library, a bridge, a recorder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["AckCallback", "Message", "MessageHandler", "Transport"]

# Called once when the broker acknowledged a publish; the argument is False when it
# answered with a failure reason code (MQTT 5, e.g. "not authorized").
AckCallback = Callable[[bool], None]


@dataclass(frozen=True)
class Message:
    """A received message. The MQTT 5 request/response fields are None under 3.1.1."""

    topic: str
    payload: bytes
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None


MessageHandler = Callable[[Message], None]


class Transport(Protocol):
    """Publishes with an acknowledgement callback and says whether it is connected.

    Implementations reconnect by themselves. Connect listeners run after every
    successful (re)connection; listeners and message handlers run on the transport's
    thread and must not block.
    """

    @property
    def connected(self) -> bool: ...

    @property
    def session(self) -> int:
        """Number of the current (or last) connection; grows by one with every connect."""
        ...

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
        """Hand one message to the connection; False if it was not sent (not connected).

        ``on_ack`` fires at most once, and never for a message that returned False; a
        message lost with the connection gets no callback: publish it again. With
        ``session`` set, the message is sent only on that connection: a caller that
        re-sends unacknowledged messages in order after a reconnect uses it so that no
        newer message slips onto a new connection ahead of the re-sends.
        """
        ...

    def add_connect_listener(self, listener: Callable[[], None]) -> None: ...

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler``, on every connection."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...
