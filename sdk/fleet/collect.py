"""The collector: MQTT in, database out.

Telemetry and events come through an MQTT 5 *shared* subscription
(``$share/<group>/edgeship/v1/<fleet>/+/telemetry``): the broker hands each message to
one collector of the group, so several collectors split a large fleet. ``status`` and
``state`` are retained latest-value messages, and brokers do not send retained messages
to shared subscriptions, so every collector subscribes to them normally (writing the
same latest value twice is harmless).

Messages are queued by the network thread and written in batches by one writer thread:
one transaction per batch keeps ingest fast, and the network thread never waits for the
disk.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ConfigError
from agent.messages.topics import PREFIX, SCHEMA_VERSION
from agent.plumbing.strict import Doc, load_json
from agent.plumbing.transport import Message, Transport
from sdk.fleet.records import EventRecord, Record, StateRecord, StatusRecord, TelemetryRecord
from sdk.fleet.store import Store

__all__ = ["CollectStats", "Collector", "parse_message"]

log = logging.getLogger(__name__)


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _status(fleet: str, device: str, ts: float, doc: dict[str, Any], raw: str) -> Record:
    attributes = doc.get("attributes")
    return StatusRecord(
        fleet,
        device,
        ts,
        str(doc.get("status")),
        attributes if isinstance(attributes, dict) else None,
        raw,
    )


def _state(fleet: str, device: str, ts: float, doc: dict[str, Any], raw: str) -> Record:
    current = _dict(doc.get("current"))
    return StateRecord(
        fleet,
        device,
        ts,
        _str(current.get("digest")),
        _str(current.get("name")),
        _str(current.get("version")),
        raw,
    )


def _seq(doc: dict[str, Any]) -> int:
    seq = _int(doc.get("seq"))
    if seq is None or seq < 1:
        raise ValueError("telemetry and events need a positive integer seq")
    return seq


def _event(fleet: str, device: str, ts: float, doc: dict[str, Any], raw: str) -> Record:
    return EventRecord(
        fleet,
        device,
        _seq(doc),
        ts,
        str(doc.get("event")),
        _str(doc.get("digest")),
        _str(doc.get("reason")),
        raw,
    )


def _telemetry(fleet: str, device: str, ts: float, doc: dict[str, Any], raw: str) -> Record:
    metrics = _dict(doc.get("metrics"))
    latency = _dict(metrics.get("latency_ms"))
    model = _dict(metrics.get("model"))
    drift = _dict(doc.get("drift"))
    psis = [
        p for i in drift.get("inputs") or [] if (p := _num(_dict(i).get("psi_max"))) is not None
    ]
    return TelemetryRecord(
        fleet=fleet,
        device=device,
        seq=_seq(doc),
        ts=ts,
        model_name=_str(model.get("name")),
        model_version=_str(model.get("version")),
        model_sequence=_int(model.get("sequence")),
        requests=_int(metrics.get("requests")),
        error_count=_int(metrics.get("error_count")),
        p50_ms=_num(latency.get("p50")),
        p95_ms=_num(latency.get("p95")),
        p99_ms=_num(latency.get("p99")),
        drift_band=_str(drift.get("band")),
        psi_max=max(psis) if psis else None,
        raw=raw,
    )


# The record each leaf's payload becomes: (fleet, device, ts, document, raw JSON) -> record.
_RECORDS: dict[str, Callable[[str, str, float, dict[str, Any], str], Record]] = {
    "status": _status,
    "state": _state,
    "events": _event,
    "telemetry": _telemetry,
}


def parse_message(topic: str, payload: bytes) -> Record | None:
    """The record a message on a v1 topic stands for; None for an empty (cleared) retained one.

    Raises:
        ValueError: not a v1 fleet topic, not a JSON object, an unknown schema version,
            sender fields that disagree with the topic, or a missing ``seq`` / ``ts``.
    """
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != PREFIX or parts[4] not in _RECORDS:
        raise ValueError(f"not an edgeship v1 device topic: {topic}")
    fleet, device, leaf = parts[2], parts[3], parts[4]
    if not payload:
        return None
    # The header is checked strictly; the body is summarised leniently (a field of a
    # newer or odd agent becomes None), and kept whole in the row's raw JSON.
    parsed = load_json(payload, what="payload", error=ValueError, duplicate_keys=True)
    doc = Doc(parsed, leaf, error=ValueError)
    doc.strict = False
    if doc.raw("v") != SCHEMA_VERSION:
        raise ValueError(f"unknown payload schema version {doc.raw('v')!r}")
    sender = (doc.text("fleet", fleet, max_len=128), doc.text("device", device, max_len=128))
    if sender != (fleet, device):
        raise ValueError(f"payload sender {sender[0]}/{sender[1]} != topic")
    ts = doc.number("ts")
    return _RECORDS[leaf](fleet, device, ts, doc.value, payload.decode("utf-8"))


@dataclass
class CollectStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    gaps: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "gaps": self.gaps,
            "batches": self.batches,
            "errors": self.errors[-10:],
        }


class Collector:
    """Subscribes to a fleet and writes what arrives into a :class:`Store`.

    ``fleet`` may be ``+`` (every fleet). ``share_group`` names the shared subscription:
    collectors with the same group split telemetry and events between them. The writer
    gathers up to ``max_batch`` messages for at most ``batch_wait_s`` after the first one
    and stores them in one transaction: that wait is the added latency, and what makes
    ingest cheap per message.
    """

    def __init__(
        self,
        transport: Transport,
        store: Store,
        *,
        fleet: str = "+",
        share_group: str = "edgeship-collectors",
        max_batch: int = 1000,
        batch_wait_s: float = 0.02,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport
        self.store = store
        self.fleet = fleet
        self.share_group = share_group
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.stats = CollectStats()
        self._clock = clock
        self._queue: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def topic_filters(self) -> list[str]:
        base = f"{PREFIX}/{self.fleet}/+"
        shared = f"$share/{self.share_group}/{base}"
        return [f"{shared}/telemetry", f"{shared}/events", f"{base}/status", f"{base}/state"]

    def start(self) -> None:
        """Start the writer thread and subscribe.

        Call it before the client connects when the client keeps a session: the broker
        sends what it queued for the session right after the CONNACK.
        """
        self._writer = threading.Thread(target=self._write_loop, name="edgeship-collect")
        self._writer.start()
        for topic_filter in self.topic_filters():
            self.transport.subscribe(topic_filter, self._queue.put)

    def stop(self) -> None:
        """Write what was received so far, then stop the writer."""
        if self._writer is None:
            return
        self._queue.put(None)
        self._writer.join()
        self._writer = None

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            # Gather a batch for up to batch_wait_s: under load a transaction then carries
            # hundreds of messages instead of the few that were queued at this instant, and
            # the waiting leaves the interpreter lock to the network thread.
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    msg = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        msg = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if msg is None:
                    stopping = True
                    break
                batch.append(msg)
            self._write(batch)

    def _write(self, batch: list[Message]) -> None:
        records: list[Record] = []
        for msg in batch:
            self.stats.received += 1
            try:
                record = parse_message(msg.topic, msg.payload)
            except (ValueError, UnicodeDecodeError) as e:
                self.stats.rejected += 1
                log.warning("rejected message on %s: %s", msg.topic, e)
                continue
            if record is not None:
                records.append(record)
        if not records:
            return
        try:
            result = self.store.write(records, self._clock())
        except ConfigError as e:  # the database failed: log, go on; the next batch may succeed
            self.stats.errors.append(str(e))
            log.warning("could not store %d records: %s", len(records), e)
            return
        self.stats.batches += 1
        self.stats.stored += result.stored
        self.stats.duplicates += result.duplicates
        self.stats.gaps += len(result.gaps)
