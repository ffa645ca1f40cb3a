"""The ``status`` message: a device's presence, retained on ``.../<device>/status``.

``online`` with the device's attributes on every connect (its birth), ``offline`` with a
``reason``: ``connection-lost`` as the MQTT last will, ``shutdown`` at a clean stop
(docs/mqtt.md, "status"). The MQTT client publishes them through a
:class:`~agent.plumbing.mqtt.Presence`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.messages.topics import Topics, encode_json, header

if TYPE_CHECKING:
    from agent.plumbing.mqtt import Presence

__all__ = ["device_presence"]


def device_presence(
    topics: Topics,
    attributes: Mapping[str, Any] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> Presence:
    """A device's presence for its MQTT client: client id ``edgeship-<fleet>-<device>``,
    retained ``status`` documents — ``online`` with ``attributes`` (birth), ``offline``
    with a ``reason`` (``connection-lost``: the last will; ``shutdown``)."""
    from agent.plumbing.mqtt import Presence  # noqa: PLC0415 - paho, with a broker only

    birth = dict(attributes or {})

    def document(status: str, reason: str | None) -> bytes:
        body = {**header(topics, clock()), "status": status}
        if reason is not None:
            body["reason"] = reason
        if status == "online":
            body["attributes"] = birth
        return encode_json(body)

    return Presence(f"edgeship-{topics.fleet}-{topics.device}", topics.status, document)
