"""The heartbeat: a short-lived statement, signed by the fleet's online key, of what exists.

Normative description: docs/bundle-format.md, section 8. It says, for one fleet and until
it expires, the latest release sequence per model name and the current trust root's
version. A device whose root names a freshness key (``roles.freshness``) needs a fresh
one to install anything: without it, or with a desired state older than what it names,
the device knows updates are being withheld and says so. The online key signs nothing
else, so alone it can neither install nor rotate anything.

Like the root, it travels as the payload of a DSSE envelope (payload type
:data:`HEARTBEAT_PAYLOAD_TYPE`); :mod:`agent.bundle.trust` holds the rules for believing
one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.bundle.manifest import format_time
from agent.bundle.root import parse_sequences, parse_time
from agent.bundle.signing import Envelope, read_envelope
from agent.errors import HeartbeatError
from agent.plumbing.strict import Doc, load_json

__all__ = [
    "HEARTBEAT_PAYLOAD_TYPE",
    "HEARTBEAT_SCHEMA_VERSION",
    "MAX_HEARTBEAT_BYTES",
    "Heartbeat",
    "heartbeat_envelope",
    "read_heartbeat",
]

HEARTBEAT_PAYLOAD_TYPE = "application/vnd.edgeship.heartbeat+json"
HEARTBEAT_SCHEMA_VERSION = "1.0"
MAX_HEARTBEAT_BYTES = 64 * 1024
_FLEET_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


@dataclass(frozen=True)
class Heartbeat:
    """A heartbeat, as parsed; ``envelope`` is the signed document as received."""

    fleet: str
    issued: datetime
    expires: datetime
    root_version: int
    latest: Mapping[str, int]
    envelope: bytes = field(default=b"", compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": HEARTBEAT_SCHEMA_VERSION,
            "fleet": self.fleet,
            "issued": format_time(self.issued),
            "expires": format_time(self.expires),
            "root_version": self.root_version,
            "latest": dict(self.latest),
        }

    def to_payload(self) -> bytes:
        """Canonical JSON (sorted keys, compact): what the online key signs."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_payload(cls, data: bytes, envelope: bytes = b"") -> Heartbeat:
        """Parse a heartbeat document strictly.

        Raises:
            HeartbeatError: anything malformed; the message names the field.
        """
        doc = load_json(data, what="heartbeat", error=HeartbeatError)
        d = Doc(doc, "heartbeat", error=HeartbeatError)
        if d.text("schema_version", max_len=16) != HEARTBEAT_SCHEMA_VERSION:
            raise d.bad("schema_version", f'"{HEARTBEAT_SCHEMA_VERSION}" (upgrade the agent)')
        latest = parse_sequences(d, "latest")
        beat = cls(
            fleet=d.text("fleet", max_len=128, pattern=_FLEET_RE, what="a fleet id"),
            issued=parse_time(d, "issued"),
            expires=parse_time(d, "expires"),
            root_version=d.integer("root_version", minimum=0, maximum=2**53),
            latest=latest,
            envelope=envelope,
        )
        d.done()
        if beat.expires <= beat.issued:
            raise HeartbeatError("heartbeat.expires must be after heartbeat.issued")
        return beat


def read_heartbeat(data: bytes) -> Heartbeat:
    """A heartbeat envelope's document, parsed strictly and NOT verified.

    Raises:
        HeartbeatError: over :data:`MAX_HEARTBEAT_BYTES`, not a canonical DSSE envelope
            of a heartbeat, or a malformed document.
    """
    return Heartbeat.from_payload(heartbeat_envelope(data).payload, data)


def heartbeat_envelope(data: bytes) -> Envelope:
    """The canonical DSSE envelope of a heartbeat, at most 64 KiB; NOT verified.

    Raises:
        HeartbeatError: too large, malformed, of another payload type, or not canonical.
    """
    return read_envelope(
        data,
        what="heartbeat",
        payload_type=HEARTBEAT_PAYLOAD_TYPE,
        max_bytes=MAX_HEARTBEAT_BYTES,
        error=HeartbeatError,
    )
