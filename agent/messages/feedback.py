"""The ``feedback`` message: the ground truth for an earlier request.

Published by an application (or a labelling service) on
``edgeship/v1/<fleet>/<device>/feedback``, QoS 1, not retained (docs/mqtt.md,
"feedback")::

    {"v":1,"request_id":"frame-1842","label":3,"model":"classifier"}

``model`` is optional (the default model); ``label`` is a class index (or one per row) for
a classifier, a number or a list of numbers otherwise: the model's feedback memory checks
it against what it answered (:mod:`agent.telemetry._feedback`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.plumbing.strict import Doc, load_json

__all__ = ["FEEDBACK_VERSION", "Feedback", "parse_feedback"]

FEEDBACK_VERSION = 1
MAX_FEEDBACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Feedback:
    request_id: str
    label: object
    model: str | None = None


def parse_feedback(payload: bytes, *, versioned: bool = True) -> Feedback:
    """Parse a ``feedback`` payload (the HTTP endpoint's body: not ``versioned``). Pure.

    Raises:
        ValueError: not a v1 feedback document (the message says why).
    """
    if len(payload) > MAX_FEEDBACK_BYTES:
        raise ValueError(f"feedback message larger than {MAX_FEEDBACK_BYTES} bytes")
    doc = Doc(load_json(payload, what="feedback", error=ValueError), "feedback", error=ValueError)
    if versioned and doc.raw("v") != FEEDBACK_VERSION:
        raise doc.bad("v", str(FEEDBACK_VERSION))
    request_id = doc.text("request_id", max_len=128)
    label = doc.raw("label")
    model = doc.opt(doc.text, "model", max_len=64)
    doc.done()
    return Feedback(request_id, label, model)
