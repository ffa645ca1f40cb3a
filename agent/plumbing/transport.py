"""The small interface everything publishes and subscribes through, and one helper on it.

:class:`agent.plumbing.mqtt.MqttClient` implements :class:`Transport` over paho-mqtt; the
telemetry reporter, MQTT serving and the fleet side only use this interface, so tests
and users can plug in another one (a different client library, a bridge, a recorder).
:func:`publish_many` is the blocking, acknowledged publish of the fleet side, built on
the interface's callback form.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from agent.errors import BrokerError

__all__ = [
    "PUBLISH_WINDOW",
    "AckCallback",
    "Message",
    "MessageHandler",
    "Transport",
    "publish_many",
]

# Called once when the broker acknowledged a publish; the argument is False when it
# answered with a failure reason code (MQTT 5, e.g. "not authorized").
AckCallback = Callable[[bool], None]

# Unacknowledged publishes :func:`publish_many` allows at once by default. 20 is paho's
# in-flight limit and mosquitto's default receive maximum: paho queues anything beyond
# it, and its queue bookkeeping is linear in the queue's length, so a larger window is
# slower, not faster (measured: ~100 µs per publish at 20, ~160 at 100).
PUBLISH_WINDOW = 20


@dataclass(frozen=True)
class Message:
    """A received message. The MQTT 5 request/response fields are None under 3.1.1.

    ``qos``, ``mid`` and ``session`` identify the delivery: the packet id on the
    connection numbered ``session`` (see :attr:`Transport.session`), which is what
    acknowledging the message to the broker takes (:meth:`Transport.ack`).
    """

    topic: str
    payload: bytes
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    qos: int = 0
    mid: int = 0
    session: int = 0


MessageHandler = Callable[[Message], None]


class Transport(Protocol):
    """Publishes with an acknowledgement callback and says whether it is connected.

    Implementations reconnect by themselves and renew subscriptions on every connection.
    Connect listeners run after every successful (re)connection; listeners and message
    handlers run on the transport's thread and must not block.
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

    def ack(self, message: Message) -> bool:
        """Acknowledge a received message to the broker once it has been handled.

        Only a transport that leaves acknowledging to its caller sends anything (the
        collector's acknowledges a message once its row is committed); others have done
        it on receipt and return True. False when the connection the message came on is
        gone (the broker redelivers it to a kept session) or it was acknowledged already.
        """
        ...

    def add_connect_listener(self, listener: Callable[[], None]) -> None: ...

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler``, on every connection.

        Several handlers may share a filter; each gets every matching message, in the
        order they subscribed. A shared subscription (``$share/<group>/<filter>``)
        delivers under the plain topic and is matched by its ``<filter>``.
        """
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class _Acks:
    """Acknowledgements of numbered publishes, waited for in order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done: dict[int, bool] = {}

    def callback(self, number: int) -> AckCallback:
        def on_ack(accepted: bool) -> None:
            with self._cond:
                self._done[number] = accepted
                self._cond.notify_all()

        return on_ack

    def wait(self, number: int, deadline: float, lost: Callable[[], bool]) -> bool | None:
        """Whether ``number`` was accepted; None when the deadline passed or ``lost()``."""
        with self._cond:
            while number not in self._done:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or lost():
                    return None
                # Short slices: a lost connection never acknowledges, so look again soon.
                self._cond.wait(min(remaining, 0.1))
            return self._done.pop(number)


def publish_many(
    transport: Transport,
    messages: Iterable[tuple[str, bytes]],
    *,
    retain: bool = False,
    window: int = PUBLISH_WINDOW,
    timeout_s: float = 10.0,
) -> int:
    """Publish with QoS 1, up to ``window`` unacknowledged at once; return when all are.

    Waiting for each acknowledgement before the next publish costs a round trip per
    message; a window keeps the connection busy while bounding what is in flight. Every
    publish is confirmed before this returns, all on one connection: after a reconnect
    nothing is re-sent behind the caller's back.

    Returns:
        How many messages were published (and acknowledged).

    Raises:
        BrokerError: not connected, the connection was lost, a publish was refused, or
            one was not acknowledged within ``timeout_s`` of becoming the oldest
            unacknowledged one.
        ValueError: ``window`` < 1.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, not {window}")
    session = transport.session
    acks = _Acks()
    pending: collections.deque[tuple[int, str]] = collections.deque()

    def lost() -> bool:
        return transport.session != session or not transport.connected

    def settle_oldest() -> None:
        number, topic = pending.popleft()
        accepted = acks.wait(number, time.monotonic() + timeout_s, lost)
        if accepted is None and lost():
            raise BrokerError(
                f"the connection to the broker was lost before it acknowledged {topic}"
                f" (the {number} messages before it were); publish again"
            )
        if accepted is None:
            raise BrokerError(
                f"the broker did not acknowledge {topic} within {timeout_s}s;"
                " check that it is running and not overloaded"
            )
        if not accepted:
            raise BrokerError(
                f"the broker refused the publish to {topic}; check its ACL for this client"
            )

    count = 0
    for topic, payload in messages:
        while len(pending) >= window:
            settle_oldest()
        if not transport.publish(
            topic, payload, retain=retain, on_ack=acks.callback(count), session=session
        ):
            raise BrokerError(
                f"cannot publish to {topic}: not connected to the broker (the {count}"
                " messages before it were sent); connect first, then publish again"
            )
        pending.append((count, topic))
        count += 1
    while pending:
        settle_oldest()
    return count
