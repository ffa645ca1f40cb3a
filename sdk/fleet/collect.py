"""The collector: MQTT in, database out, and nothing acknowledged before it is stored.

Telemetry and events come through an MQTT 5 *shared* subscription
(``$share/<group>/edgeship/v1/<fleet>/+/telemetry``): the broker hands each message to
one collector of the group, so several collectors split a large fleet. ``status`` and
``state`` are retained latest-value messages, and brokers do not send retained messages
to shared subscriptions, so every collector subscribes to them normally (writing the
same latest value twice is harmless), a named model's state on
``.../<device>/models/<model>/state`` too. The default group is named after the store
(:func:`default_group`): collectors writing one database share the work, collectors
writing different ones each get every message.

Messages are queued by the network thread and written in batches by one writer thread:
one transaction per batch keeps ingest fast, and the network thread never waits for the
disk. Every message of a batch is acknowledged to the broker only once the batch is
committed (the transport leaves acknowledging to us: ``MqttClient(manual_ack=True)``).
While the store is out (a restart, a lost connection, a lock) the writer holds the batch
unacknowledged and retries with backoff; the client holds at most :data:`MAX_HELD`
unacknowledged messages and then stops reading, so the broker keeps the rest queued for
the session. A message whose connection died before its acknowledgement comes again
from the broker; the store counts it as a duplicate of its ``(fleet, device, seq)``.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.messages.topics import PREFIX
from agent.plumbing.backoff import Backoff
from agent.plumbing.transport import Message, Transport
from sdk.errors import StoreError, StoreUnavailableError
from sdk.fleet.records import Record, WriteResult, parse_message
from sdk.fleet.store import Store

__all__ = ["MAX_HELD", "CollectStats", "Collector", "default_group", "parse_message"]

log = logging.getLogger(__name__)

# The most messages a collector's client holds unacknowledged (MqttClient max_unacked):
# it asks the broker for half of it (Receive Maximum, 2,000), twice a full batch, so that
# the next batch arrives while the previous one commits.
MAX_HELD = 4000


def default_group(location: str) -> str:
    """The shared-subscription group of collectors writing the store at ``location``.

    A digest, so the name holds no path or host (and never a password: ``location`` has
    none) and is a valid topic level.
    """
    return "edgeship-" + hashlib.sha256(location.encode()).hexdigest()[:12]


@dataclass
class CollectStats:
    """What a collector did, as ``edgeship collect --json`` prints it.

    ``unacked``: stored messages whose acknowledgement could not be sent (their connection
    was gone); the broker delivers them again and they count as duplicates then.
    ``unstored``: messages neither stored nor acknowledged (the collector stopped during
    an outage, or after a fatal error); a kept session gets them again. ``store``: "ok",
    "unavailable" (waiting for it) or "failed" (stopped).
    """

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    gaps: int = 0
    batches: int = 0
    unacked: int = 0
    unstored: int = 0
    outages: int = 0
    outage_s: float = 0.0
    store: str = "ok"
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["outage_s"] = round(self.outage_s, 3)
        doc["errors"] = self.errors[-10:]
        return doc


class _Mark(enum.Enum):
    FLUSH = "flush"  # write what came before, then say so
    STOP = "stop"


class Collector:
    """Subscribes to a fleet and writes what arrives into a :class:`Store`.

    ``fleet`` may be ``+`` (every fleet). ``share_group`` names the shared subscription
    (default: :func:`default_group` of the store). The writer gathers up to ``max_batch``
    messages for at most ``batch_wait_s`` after the first one and stores them in one
    transaction: that wait is the added latency, and what makes ingest cheap per message.
    A store that is out is retried after a :class:`~agent.plumbing.backoff.Backoff` from
    ``retry_initial_s`` to ``retry_max_s`` (a few collectors retrying their database need
    no long waits, and storing resumes within seconds of its return); one that refuses
    for good (schema, permission) stops the collector: ``fatal`` says why, and
    ``on_fatal`` is called with it.

    Pass a transport with manual acknowledgement (``MqttClient(manual_ack=True,
    max_unacked=MAX_HELD)``); with one that acknowledges on receipt, what the collector
    held when it died is lost.
    """

    def __init__(
        self,
        transport: Transport,
        store: Store,
        *,
        fleet: str = "+",
        share_group: str | None = None,
        max_batch: int = 1000,
        batch_wait_s: float = 0.02,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 5.0,
        on_fatal: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.transport = transport
        self.store = store
        self.fleet = fleet
        self.share_group = share_group or default_group(store.location)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.stats = CollectStats()
        self.fatal: str | None = None
        self._on_fatal = on_fatal
        self._clock = clock
        self._backoff = Backoff(retry_initial_s, retry_max_s, rand=rand)
        self._outage_since: float | None = None
        self._queue: queue.SimpleQueue[Message | _Mark] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._flushed = threading.Event()
        self._writer: threading.Thread | None = None

    def topic_filters(self) -> list[str]:
        base = f"{PREFIX}/{self.fleet}/+"
        shared = f"$share/{self.share_group}/{base}"
        return [
            f"{shared}/telemetry",
            f"{shared}/events",
            f"{base}/status",
            f"{base}/state",
            f"{base}/models/+/state",
        ]

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
        """Store and acknowledge what was received, stop the transport, store the rest.

        What arrives between the last acknowledgement and the disconnect is stored but
        cannot be acknowledged any more: a kept session gets it again (a duplicate). In a
        store outage nothing more is tried: what is held stays unacknowledged.
        """
        writer = self._writer
        if writer is None:
            return
        self._stopping.set()
        self._queue.put(_Mark.FLUSH)
        while not self._flushed.wait(0.5) and writer.is_alive():
            pass
        self.transport.stop()
        self._queue.put(_Mark.STOP)
        writer.join()
        self._writer = None

    # --- the writer thread -------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch, mark = self._gather()
            if batch:
                try:
                    self._settle(batch)
                except Exception as e:  # a bug must stop the collector, not hang it
                    log.exception("the collector's writer failed")
                    self._fail(f"the collector's writer failed: {type(e).__name__}: {e}")
            if mark is _Mark.FLUSH:
                self._flushed.set()
            elif mark is _Mark.STOP:
                return

    def _gather(self) -> tuple[list[Message], _Mark | None]:
        """The next batch, and the mark that ended it early (if one did)."""
        first = self._queue.get()
        if isinstance(first, _Mark):
            return [], first
        batch = [first]
        # Gather a batch for up to batch_wait_s: under load a transaction then carries
        # hundreds of messages instead of the few that were queued at this instant, and
        # the waiting leaves the interpreter lock to the network thread.
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if isinstance(item, _Mark):
                return batch, item
            batch.append(item)
        return batch, None

    def _settle(self, batch: list[Message]) -> None:
        """Store the batch, then acknowledge every message of it (rejected ones too)."""
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
        result = self._store(records, len(batch))
        if result is None:
            self.stats.unstored += len(batch)
            return
        self.stats.batches += 1
        self.stats.stored += result.stored
        self.stats.duplicates += result.duplicates
        self.stats.gaps += len(result.gaps)
        for msg in batch:
            if not self.transport.ack(msg):
                self.stats.unacked += 1

    def _store(self, records: list[Record], held: int) -> WriteResult | None:
        """The batch's result once committed; None when it was not (fatal, or stopping)."""
        while self.fatal is None:
            if not records:
                return WriteResult()
            try:
                result = self.store.write(records, self._clock())
            except StoreUnavailableError as e:
                self._outage(e, held)
                if self._stopping.wait(self._backoff.next()):
                    log.warning(
                        "stopping during a store outage: %d message(s) neither stored nor"
                        " acknowledged; a kept broker session delivers them again",
                        held,
                    )
                    return None
                continue
            except StoreError as e:
                self._fail(str(e))
                return None
            self._recovered()
            return result
        return None

    def _outage(self, error: StoreError, held: int) -> None:
        self.stats.errors.append(str(error))
        if self._outage_since is not None:
            return
        self._outage_since = time.monotonic()
        self.stats.outages += 1
        self.stats.store = "unavailable"
        log.warning(
            "cannot store: %s; holding %d message(s) unacknowledged and retrying with"
            " backoff (up to %gs); the broker keeps the rest queued",
            error,
            held,
            self._backoff.max_s,
        )

    def _recovered(self) -> None:
        self._backoff.reset()
        if self._outage_since is None:
            return
        lasted = time.monotonic() - self._outage_since
        self._outage_since = None
        self.stats.outage_s += lasted
        self.stats.store = "ok"
        log.warning("the store is back after %.1fs; storing and acknowledging again", lasted)

    def _fail(self, reason: str) -> None:
        self.fatal = reason
        self.stats.store = "failed"
        self.stats.errors.append(reason)
        log.error("cannot store: %s; stopping, with nothing unstored acknowledged", reason)
        if self._on_fatal is not None:
            self._on_fatal(reason)
