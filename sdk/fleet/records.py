"""What the collector stores: one record per kind of device message, how a message
becomes one (:func:`parse_message`), and a batch's result.

Every record but a status names the model it is about (docs/mqtt.md, "Several models"):
a state by its topic (``.../state`` is model ``default``'s, ``.../models/NAME/state``
NAME's, and the document's ``"model"`` must agree), telemetry and events by their
``"model"`` field (absent: ``default``, as older agents send). Telemetry also carries
one :class:`VersionRecord` per version that served in its window (A/B splits, shadows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.messages.desired import DEFAULT_MODEL, MODEL_RE
from agent.messages.topics import PREFIX, SCHEMA_VERSION
from agent.plumbing.strict import Doc, load_json

__all__ = [
    "EventRecord",
    "Record",
    "StateRecord",
    "StatusRecord",
    "TelemetryRecord",
    "VersionRecord",
    "WriteResult",
    "parse_message",
]


@dataclass(frozen=True)
class StatusRecord:
    fleet: str
    device: str
    ts: float
    status: str
    attributes: dict[str, Any] | None
    raw: str


@dataclass(frozen=True)
class StateRecord:
    fleet: str
    device: str
    ts: float
    current_digest: str | None
    current_name: str | None
    current_version: str | None
    raw: str
    model: str = DEFAULT_MODEL


@dataclass(frozen=True)
class EventRecord:
    fleet: str
    device: str
    seq: int
    ts: float
    event: str
    digest: str | None
    reason: str | None
    raw: str
    model: str = DEFAULT_MODEL


@dataclass(frozen=True)
class VersionRecord:
    """What one version of a model did in a telemetry window (``versions`` entries)."""

    digest: str
    role: str  # serving, candidate or shadow
    requests: int | None
    error_count: int | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    labels: int | None  # feedback received for its answers, and how many were right
    correct: int | None


@dataclass(frozen=True)
class TelemetryRecord:
    fleet: str
    device: str
    seq: int
    ts: float
    model_name: str | None
    model_version: str | None
    model_sequence: int | None
    requests: int | None
    error_count: int | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    drift_band: str | None
    psi_max: float | None
    raw: str
    model: str = DEFAULT_MODEL
    versions: tuple[VersionRecord, ...] = ()


Record = StatusRecord | StateRecord | EventRecord | TelemetryRecord


@dataclass
class WriteResult:
    stored: int = 0
    duplicates: int = 0
    gaps: list[tuple[str, str, int, int]] = field(default_factory=list)  # new missing ranges


# Both databases store integers as signed 64-bit: a larger one in a message would fail the
# whole batch it came in.
_INT64 = range(-(2**63), 2**63)


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value in _INT64:
        return value
    return None


def _encodable(text: str) -> bool:
    # PostgreSQL's text cannot hold NUL, and no database takes a lone surrogate (JSON
    # "\ud800" parses to one): either would fail the whole batch, and the message, never
    # acknowledged, would fail it again after every restart.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and _encodable(value) else None


def _text(value: object) -> str:
    """A column that must have a value: what was sent, as storable text."""
    text = str(value).replace("\x00", "\ufffd")
    return text if _encodable(text) else text.encode("utf-8", "replace").decode("utf-8")


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


class _Head(NamedTuple):
    """Who sent a message, about which model, when (checked against the topic)."""

    fleet: str
    device: str
    model: str
    ts: float


def _status(h: _Head, doc: dict[str, Any], raw: str) -> Record:
    attributes = doc.get("attributes")
    return StatusRecord(
        h.fleet,
        h.device,
        h.ts,
        _text(doc.get("status")),
        attributes if isinstance(attributes, dict) else None,
        raw,
    )


def _state(h: _Head, doc: dict[str, Any], raw: str) -> Record:
    current = _dict(doc.get("current"))
    return StateRecord(
        h.fleet,
        h.device,
        h.ts,
        _str(current.get("digest")),
        _str(current.get("name")),
        _str(current.get("version")),
        raw,
        h.model,
    )


def _seq(doc: dict[str, Any]) -> int:
    seq = _int(doc.get("seq"))
    if seq is None or seq < 1:
        raise ValueError("telemetry and events need a positive 64-bit integer seq")
    return seq


def _event(h: _Head, doc: dict[str, Any], raw: str) -> Record:
    return EventRecord(
        h.fleet,
        h.device,
        _seq(doc),
        h.ts,
        _text(doc.get("event")),
        _str(doc.get("digest")),
        _str(doc.get("reason")),
        raw,
        h.model,
    )


def _version(entry: object) -> VersionRecord | None:
    """One ``versions`` entry; None when it names no digest (nothing to key it by)."""
    v = _dict(entry)
    digest = _str(v.get("digest"))
    if digest is None:
        return None
    latency = _dict(v.get("latency_ms"))
    feedback = _dict(v.get("feedback"))
    return VersionRecord(
        digest=digest,
        role=_str(v.get("role")) or "?",
        requests=_int(v.get("requests")),
        error_count=_int(v.get("error_count")),
        p50_ms=_num(latency.get("p50")),
        p95_ms=_num(latency.get("p95")),
        p99_ms=_num(latency.get("p99")),
        labels=_int(feedback.get("labels")),
        correct=_int(feedback.get("correct")),
    )


def _telemetry(h: _Head, doc: dict[str, Any], raw: str) -> Record:
    metrics = _dict(doc.get("metrics"))
    latency = _dict(metrics.get("latency_ms"))
    bundle = _dict(metrics.get("model"))
    drift = _dict(doc.get("drift"))
    psis = [
        p for i in _list(drift.get("inputs")) if (p := _num(_dict(i).get("psi_max"))) is not None
    ]
    versions = {v.digest: v for v in map(_version, _list(doc.get("versions"))) if v is not None}
    return TelemetryRecord(
        fleet=h.fleet,
        device=h.device,
        seq=_seq(doc),
        ts=h.ts,
        model_name=_str(bundle.get("name")),
        model_version=_str(bundle.get("version")),
        model_sequence=_int(bundle.get("sequence")),
        requests=_int(metrics.get("requests")),
        error_count=_int(metrics.get("error_count")),
        p50_ms=_num(latency.get("p50")),
        p95_ms=_num(latency.get("p95")),
        p99_ms=_num(latency.get("p99")),
        drift_band=_str(drift.get("band")),
        psi_max=max(psis) if psis else None,
        raw=raw,
        model=h.model,
        versions=tuple(versions.values()),
    )


# The record each leaf's payload becomes: (header, document, raw JSON) -> record.
_RECORDS: dict[str, Callable[[_Head, dict[str, Any], str], Record]] = {
    "status": _status,
    "state": _state,
    "events": _event,
    "telemetry": _telemetry,
}


def _topic(topic: str) -> tuple[str, str, str | None, str]:
    """(fleet, device, the model a ``models/NAME/state`` topic names or None, leaf).

    Raises:
        ValueError: not a v1 device topic the collector reads.
    """
    parts = topic.split("/")
    if "/".join(parts[:2]) == PREFIX and len(parts) == 5 and parts[4] in _RECORDS:
        return parts[2], parts[3], None, parts[4]
    if (
        "/".join(parts[:2]) == PREFIX
        and len(parts) == 7
        and parts[4] == "models"
        and parts[6] == "state"
        and MODEL_RE.fullmatch(parts[5])
        # model "default" reports on the device-level topic; this one is no agent's
        and parts[5] != DEFAULT_MODEL
    ):
        return parts[2], parts[3], parts[5], "state"
    raise ValueError(f"not an edgeship v1 device topic: {topic}")


def parse_message(topic: str, payload: bytes) -> Record | None:
    """The record a message on a v1 topic stands for; None for an empty (cleared) retained one.

    Raises:
        ValueError: not a v1 fleet topic, not a JSON object, an unknown schema version,
            sender fields or a model that disagree with the topic, a model name that is
            none, or a missing ``seq`` / ``ts``.
    """
    fleet, device, topic_model, leaf = _topic(topic)
    if not payload:
        return None
    # The header is checked strictly; the body is summarised leniently (a field of a
    # newer or odd agent becomes None), and kept whole in the row's raw JSON. The
    # duplicate-key check is off: it doubled the parse time (docs/benchmarks.md, "Fleet").
    parsed = load_json(payload, what="payload", error=ValueError, duplicate_keys=True)
    doc = Doc(parsed, leaf, error=ValueError)
    doc.strict = False
    if doc.raw("v") != SCHEMA_VERSION:
        raise ValueError(f"unknown payload schema version {doc.raw('v')!r}")
    sender = (doc.text("fleet", fleet, max_len=128), doc.text("device", device, max_len=128))
    if sender != (fleet, device):
        raise ValueError(f"payload sender {sender[0]}/{sender[1]} != topic")
    ts = doc.number("ts")
    model = doc.text("model", DEFAULT_MODEL, max_len=64, pattern=MODEL_RE, what="a model name")
    if leaf == "state" and model != (topic_model or DEFAULT_MODEL):
        raise ValueError(
            f"a state of model {model!r} on the topic of {topic_model or DEFAULT_MODEL!r}"
        )
    head = _Head(fleet, device, model, ts)
    return _RECORDS[leaf](head, doc.value, payload.decode("utf-8"))
