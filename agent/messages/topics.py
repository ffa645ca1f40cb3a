"""MQTT topic names of protocol v1: ``edgeship/v1/<fleet>/<device>/<leaf>``, a named
model's ``edgeship/v1/<fleet>/<device>/models/<model>/<leaf>`` (``desired`` and ``state``;
the model called ``default`` keeps the device-level ones), and the fleet-wide
``edgeship/v1/<fleet>/trust/root`` and ``.../trust/heartbeat``.

Fleet and device ids become topic levels, so they must be non-empty and free of the
MQTT separators and wildcards (``/``, ``+``, ``#``) and of NUL; ``trust`` is no device id
(its level holds the fleet's trust documents).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.messages.desired import DEFAULT_MODEL, MODEL_RE

__all__ = [
    "PREFIX",
    "SCHEMA_VERSION",
    "TRUST_LEVEL",
    "Topics",
    "check_id",
    "encode_json",
    "header",
    "trust_topic",
]

PREFIX = "edgeship/v1"
# The "v" field of every JSON payload on these topics (see docs/mqtt.md).
SCHEMA_VERSION = 1

_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
# The level under a fleet where its trust documents live, in place of a device id.
TRUST_LEVEL = "trust"


def check_id(kind: str, value: str) -> str:
    """``value`` if usable as a fleet or device id.

    Raises:
        ValueError: empty, longer than 128 characters, or a character outside ``[A-Za-z0-9._:@-]``.
    """
    if not _ID.fullmatch(value):
        raise ValueError(f"{kind} id {value!r} must match {_ID.pattern} (it becomes a topic level)")
    return value


@dataclass(frozen=True)
class Topics:
    """The topics of one device."""

    fleet: str
    device: str

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)
        check_id("device", self.device)
        if self.device == TRUST_LEVEL:
            raise ValueError(f"{TRUST_LEVEL!r} is no device id: it names the fleet's trust topics")

    @property
    def base(self) -> str:
        return f"{PREFIX}/{self.fleet}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def desired(self) -> str:
        return f"{self.base}/desired"

    def desired_for(self, model: str) -> str:
        """Where ``model``'s desired state is retained (``desired`` for ``default``)."""
        return self.desired if model == DEFAULT_MODEL else f"{self.model_base(model)}/desired"

    def state_for(self, model: str) -> str:
        """Where ``model``'s reported state is retained (``state`` for ``default``)."""
        return self.state if model == DEFAULT_MODEL else f"{self.model_base(model)}/state"

    def model_base(self, model: str) -> str:
        """``<base>/models/<model>``.

        Raises:
            ValueError: not a model name (docs/agent.md, "Several models").
        """
        if not MODEL_RE.fullmatch(model):
            raise ValueError(f"model name {model!r} must match {MODEL_RE.pattern}")
        return f"{self.base}/models/{model}"

    @property
    def feedback(self) -> str:
        """Ground truth for earlier requests (docs/mqtt.md, "feedback")."""
        return f"{self.base}/feedback"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def infer_request(self) -> str:
        return f"{self.base}/infer/request"

    @property
    def infer_response(self) -> str:
        return f"{self.base}/infer/response"

    @property
    def trust_root(self) -> str:
        """The fleet's latest signed trust root (retained; fleet-wide, read-only for devices)."""
        return trust_topic(self.fleet, "root")

    @property
    def trust_heartbeat(self) -> str:
        """The fleet's latest heartbeat (retained; fleet-wide, read-only for devices)."""
        return trust_topic(self.fleet, "heartbeat")


def trust_topic(fleet: str, document: str) -> str:
    """``edgeship/v1/<fleet>/trust/<document>`` (``root`` or ``heartbeat``).

    Raises:
        ValueError: the fleet id cannot be a topic level, or the document is unknown.
    """
    if document not in ("root", "heartbeat"):
        raise ValueError(f"no trust document {document!r}: root or heartbeat")
    return f"{PREFIX}/{check_id('fleet', fleet)}/{TRUST_LEVEL}/{document}"


def encode_json(body: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted UTF-8 JSON.

    Raises:
        ValueError: NaN or infinity in the body.
        TypeError: a value JSON cannot represent.
    """
    return json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def header(topics: Topics, ts: float) -> dict[str, Any]:
    """The fields every payload of a device starts with (docs/mqtt.md, "Payloads")."""
    return {"v": SCHEMA_VERSION, "fleet": topics.fleet, "device": topics.device, "ts": round(ts, 3)}
