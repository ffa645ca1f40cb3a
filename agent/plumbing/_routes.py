"""Which handlers a received message goes to: one table for plain and shared subscriptions.

A shared subscription (``$share/<group>/<filter>``) delivers under the plain topic, so
paho's per-filter callbacks never match it; every message is routed here by its topic
instead. Matching a topic against every filter with paho's matcher costs ~5 µs per
filter — a sixth of a collector's network thread, which is what limits its ingest — so
each topic's handlers are computed once and remembered.
"""

from __future__ import annotations

import threading

from agent.plumbing._paho_client import paho
from agent.plumbing.transport import MessageHandler

__all__ = ["Routes", "plain_filter"]

# Topics whose handlers are remembered (one per device and message kind); beyond that the
# memory starts over, so a fleet of any size costs at most this many entries.
_MAX_ROUTES = 100_000


def plain_filter(topic_filter: str) -> str:
    """The filter messages of ``topic_filter`` match: ``$share/<group>/`` stripped."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class Routes:
    """Subscriptions (filter, handler, QoS) in the order they were made. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: list[tuple[str, str, MessageHandler, int]] = []
        self._cache: dict[str, tuple[MessageHandler, ...]] = {}

    def add(self, topic_filter: str, handler: MessageHandler, qos: int) -> None:
        with self._lock:
            self._subscriptions.append((topic_filter, plain_filter(topic_filter), handler, qos))
            self._cache.clear()

    def filters(self) -> dict[str, int]:
        """Each filter to subscribe to, with its QoS."""
        with self._lock:
            return {f: qos for f, _plain, _h, qos in self._subscriptions}

    def handlers(self, topic: str) -> tuple[MessageHandler, ...]:
        """The handlers of a message on ``topic``, in subscription order."""
        handlers = self._cache.get(topic)
        if handlers is not None:
            return handlers
        with self._lock:
            handlers = tuple(
                h
                for _f, plain, h, _q in self._subscriptions
                if paho.topic_matches_sub(plain, topic)
            )
            if len(self._cache) >= _MAX_ROUTES:
                self._cache.clear()
            self._cache[topic] = handlers
        return handlers
