"""What the collector stores: one record per kind of device message, and a batch's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EventRecord",
    "Record",
    "StateRecord",
    "StatusRecord",
    "TelemetryRecord",
    "WriteResult",
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


Record = StatusRecord | StateRecord | EventRecord | TelemetryRecord


@dataclass
class WriteResult:
    stored: int = 0
    duplicates: int = 0
    gaps: list[tuple[str, str, int, int]] = field(default_factory=list)  # new missing ranges
