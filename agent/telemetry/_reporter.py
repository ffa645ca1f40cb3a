"""The reporter: snapshots telemetry into the outbox and drains the outbox to the broker.

One background thread does both jobs:

* every ``interval_s`` it snapshots metrics, drift/confidence and system numbers into
  one telemetry message, appended to the durable outbox;
* whenever the transport is connected it publishes stored messages in ``seq`` order,
  with at most ``max_inflight`` unacknowledged, and deletes each one when its PUBACK
  arrives. After a reconnect it starts again from the oldest unacknowledged message
  (at-least-once: the collector drops duplicates by ``seq``), and it publishes only on
  the connection it started on, so the order per device holds across reconnects.

``emit_event`` (lifecycle events from the updater) and ``set_state`` (the retained
reported state) can be called from any thread; they only write to the outbox and wake
the thread, so the caller never waits for the network.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.messages.topics import Topics, header
from agent.plumbing.transport import Transport
from agent.telemetry._drift import DriftMonitor
from agent.telemetry._metrics import Metrics
from agent.telemetry._observe import OutputKind
from agent.telemetry._system import SystemSampler

if TYPE_CHECKING:
    from agent.telemetry._outbox import Outbox  # sqlite3: imported with a broker only

__all__ = ["EVENT_KINDS", "Reporter", "TelemetryConfig"]

log = logging.getLogger(__name__)

# The lifecycle events the updater emits (agent/install/_updater.py, docs/mqtt.md); other
# kebab-case kinds are accepted so a newer agent can add some without a schema change.
EVENT_KINDS = (
    "install-started",
    "downloaded",
    "download-failed",
    "verified",
    "staged",
    "health-check-passed",
    "provider-fallback",
    "activated",
    "committed",
    "rolled-back",
    "failed",
)
_EVENT_KIND = re.compile(r"[a-z][a-z0-9-]{0,63}")
_RESERVED = frozenset({"v", "fleet", "device", "ts", "seq", "event", "dropped"})
# How often stored messages are checked for expiry.
_EXPIRE_EVERY_S = 30.0


@dataclass(frozen=True)
class TelemetryConfig:
    """``[telemetry]``: metrics, drift and system numbers, through the durable outbox."""

    interval_s: float = 10.0
    outbox_max_bytes: int = 16 * 1024**2
    # Telemetry older than this is dropped (counted as expired) and carries the remaining
    # lifetime as MQTT 5 message expiry. Lifecycle events never expire.
    ttl_s: float | None = 24 * 3600.0
    # How model outputs are summarised: "auto" treats a (batch, k >= 2) float output as
    # class scores (top-score histogram), anything else as plain values.
    output_kind: OutputKind = "auto"
    max_inflight: int = 100  # not in agent.toml
    batch: int = 50  # not in agent.toml


class Reporter:
    """Ties metrics, drift, system numbers, the outbox and a transport together.

    The transport's lifetime (start/stop) belongs to the caller, since MQTT serving
    shares it.
    """

    def __init__(
        self,
        topics: Topics,
        outbox: Outbox,
        transport: Transport,
        *,
        metrics: Metrics | None = None,
        drift: DriftMonitor | None = None,
        system: SystemSampler | None = None,
        config: TelemetryConfig | None = None,
        clock: Callable[[], float] = time.time,
        sections: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.topics = topics
        # Several models: one telemetry message per section (its "model", "metrics",
        # "drift", ...) instead of one from ``metrics`` and ``drift``.
        self.sections = sections
        self.outbox = outbox
        self.transport = transport
        self.metrics = metrics if metrics is not None else Metrics()
        self.drift = drift
        self.system = system
        self.config = config if config is not None else TelemetryConfig()
        self._clock = clock
        self._cond = threading.Condition()
        self._acked: list[int] = []
        self._inflight: set[int] = set()
        self._cursor = 0
        self._session = -1
        self._state_dirty = False
        self._kicked = False  # work arrived while the thread was busy: do not sleep
        self._refused = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- called by the agent ---------------------------------------------------------

    def set_drift(self, drift: DriftMonitor | None) -> None:
        """Swap the drift monitor (a new model brings a new drift reference)."""
        self.drift = drift

    def emit_event(self, kind: str, /, **fields: Any) -> int:
        """Store a lifecycle event durably (fsynced) for delivery; returns its ``seq``.

        Raises:
            ValueError: the kind is not kebab-case, a field name is reserved, or a value
                is not JSON.
        """
        if not _EVENT_KIND.fullmatch(kind):
            raise ValueError(f"event kind {kind!r} must be kebab-case, e.g. 'rolled-back'")
        clash = _RESERVED & fields.keys()
        if clash:
            raise ValueError(f"event fields {sorted(clash)} are reserved")
        body = {**self._header(), "event": kind, **fields}
        seq = self.outbox.append(self.topics.events, "event", body)
        assert seq is not None  # the outbox always makes room for an event
        self._wake()
        return seq

    def event_sink(self, kind: str, fields: Mapping[str, Any], /) -> None:
        """:class:`agent.install._updater.EventSink` adapter: like :meth:`emit_event`, never raises.

        An update must not fail because its telemetry is malformed: a bad event is
        logged and replaced by an ``invalid-event`` event naming the problem.
        """
        try:
            self.emit_event(kind, **fields)
        except ValueError as e:
            log.warning("dropping invalid %r event: %s", kind, e)
            self.emit_event("invalid-event", kind=kind[:64], reason=str(e)[:256])

    def set_state(self, state: Mapping[str, Any], topic: str | None = None) -> None:
        """Replace the retained reported state (on ``topic``, by default the device's
        ``state``); it is published now or on the next connect.

        Raises:
            ValueError: the state is not JSON or uses a reserved key.
        """
        clash = {"v", "fleet", "device", "ts"} & state.keys()
        if clash:
            raise ValueError(f"state keys {sorted(clash)} are reserved")
        self.outbox.put_retained(topic or self.topics.state, {**self._header(), **state})
        with self._cond:
            self._state_dirty = True
            self._cond.notify()

    def report_now(self) -> int | None:
        """Snapshot telemetry into the outbox (a message per model with ``sections``); the
        last ``seq`` (None if no room)."""
        if self.sections is not None:
            sections = self.sections()
        else:
            drift = None if self.drift is None else self.drift.snapshot()
            sections = [{"metrics": self.metrics.snapshot().to_json(), "drift": drift}]
        system = None if self.system is None else self.system.sample()
        stats = self.outbox.stats()
        outbox = {"rows": stats.rows, "bytes": stats.stored_bytes, "refused": self._refused}
        seq = None
        for section in sections:
            body: dict[str, Any] = {
                **self._header(),
                "interval_s": self.config.interval_s,
                **section,
                "system": system,
                "outbox": outbox,
            }
            seq = self.outbox.append(
                self.topics.telemetry, "telemetry", body, ttl_s=self.config.ttl_s
            )
        self._wake()
        return seq

    def flush(self, timeout_s: float) -> bool:
        """Wait until every stored message is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.outbox.stats().rows == 0:
                return True
            self._wake()
            time.sleep(0.02)
        return self.outbox.stats().rows == 0

    # --- lifetime ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgeship-reporter", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; stored messages stay in the outbox for the next start."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.outbox.ack(self._take_acked())

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.config.interval_s
        next_report = time.monotonic() + interval
        next_expire = time.monotonic()
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._kicked = False
            now = time.monotonic()
            try:
                if now >= next_report:
                    self.report_now()
                    # Skip missed ticks (a suspended device) instead of bursting.
                    next_report = max(next_report + interval, now + interval / 2)
                if now >= next_expire:
                    self.outbox.expire()
                    next_expire = now + _EXPIRE_EVERY_S
                busy = self._drain()
            except Exception:
                log.exception("telemetry reporter iteration failed; retrying")
                busy = False
            with self._cond:
                idle = not (self._state_dirty or self._kicked or busy)
                if idle and not self._stopping:
                    self._cond.wait(max(0.0, min(next_report - time.monotonic(), 1.0)))

    def _drain(self) -> bool:
        """Delete acknowledged rows, publish what fits; True if more is ready to send."""
        self.outbox.ack(self._take_acked())
        t = self.transport
        if not t.connected:
            return False
        session = t.session
        with self._cond:
            if session != self._session:
                # A new connection: whatever was in flight on the old one gets no ack.
                self._session = session
                self._cursor = 0
                self._inflight.clear()
                self._state_dirty = True
            publish_state = self._state_dirty
            self._state_dirty = False
            room = self.config.max_inflight - len(self._inflight)
        if publish_state:
            for topic, payload in self.outbox.retained().items():
                if not t.publish(topic, payload, retain=True, session=session):
                    with self._cond:
                        self._state_dirty = True
                    return False
        if room <= 0:
            return False
        records = self.outbox.pending(self._cursor, min(room, self.config.batch))
        now = self._clock()
        for r in records:
            expiry = None
            if r.expires is not None:
                expiry = r.expires - now
                if expiry <= 0:
                    self._cursor = r.seq
                    continue  # expire() removes and counts it
            with self._cond:
                self._inflight.add(r.seq)
            sent = t.publish(
                r.topic,
                r.payload,
                qos=r.qos,
                expiry_s=expiry,
                on_ack=self._ack_callback(r.seq),
                session=session,
            )
            if not sent:
                with self._cond:
                    self._inflight.discard(r.seq)
                return False
            self._cursor = r.seq
        # A full batch with room left over: more is probably waiting.
        return len(records) == self.config.batch and room > len(records)

    def _ack_callback(self, seq: int) -> Callable[[bool], None]:
        def on_ack(accepted: bool) -> None:
            with self._cond:
                self._acked.append(seq)
                self._inflight.discard(seq)
                if not accepted:
                    # MQTT 5 failure reason (e.g. not authorized): re-sending cannot help,
                    # so it is deleted like an accepted one and counted.
                    self._refused += 1
                # Wake the thread at the low-water mark, not per ack, so that one
                # transaction deletes and one query refills about half the window.
                if len(self._inflight) <= self.config.max_inflight // 2:
                    self._kicked = True
                    self._cond.notify()

        return on_ack

    def _take_acked(self) -> list[int]:
        with self._cond:
            acked, self._acked = self._acked, []
        return acked

    def _wake(self) -> None:
        with self._cond:
            self._kicked = True
            self._cond.notify()

    def _header(self) -> dict[str, Any]:
        return header(self.topics, self._clock())
