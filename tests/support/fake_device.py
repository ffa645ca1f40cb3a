"""A simulated device that speaks the MQTT protocol of the agent, without a model.

It connects with the agent's own MQTT client (birth with attributes, last will), follows
its retained ``desired`` topic and answers like the updater would: events
``install-started`` -> ``activated`` -> ``committed`` (or ``rolled-back`` for digests it
is told to fail, or nothing for ``silent`` devices), and a retained ``state`` after each
step. ``send_telemetry`` publishes telemetry messages with the shared ``seq`` counter.

:class:`ReportingDevice` is a device's real telemetry path instead: the agent's
``Reporter`` with its durable ``Outbox`` and ``MqttClient``. A message leaves the outbox
only on the broker's PUBACK, so :meth:`ReportingDevice.acked` says which ``seq`` the
broker acknowledged without asking the collector.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.messages.status import device_presence
from agent.messages.topics import Topics, encode_json
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import Message
from agent.telemetry import Metrics, Outbox, Reporter, TelemetryConfig

__all__ = ["FakeDevice", "ReportingDevice", "start_devices"]


class FakeDevice:
    def __init__(
        self,
        host: str,
        port: int,
        fleet: str,
        device: str,
        *,
        attributes: dict[str, Any] | None = None,
        fail_digests: Iterable[str] = (),
        silent: bool = False,
        probation_s: float = 0.0,
    ) -> None:
        self.fleet, self.device = fleet, device
        self.topics = Topics(fleet, device)
        self.fail_digests = set(fail_digests)
        self.silent = silent
        self.probation_s = probation_s
        self.seq = 0
        self.current: dict[str, Any] | None = None
        self.previous: dict[str, Any] | None = None
        self.last_failure: dict[str, Any] | None = None
        self.probation: dict[str, Any] | None = None
        self.desired_seen: list[dict[str, Any] | None] = []
        self._lock = threading.Lock()
        self.transport = MqttClient(
            BrokerConfig(
                BrokerUrl(host, port, tls=False), backoff_initial_s=0.1, backoff_max_s=0.5
            ),
            presence=device_presence(self.topics, attributes),
        )
        self.transport.subscribe(self.topics.desired, self._on_desired)

    def start(self, timeout_s: float = 10.0) -> FakeDevice:
        self.transport.start()
        if not self.transport.wait_connected(timeout_s):
            raise RuntimeError(f"fake device {self.device} could not connect")
        return self

    def stop(self) -> None:
        self.transport.stop()

    def _next_seq(self) -> int:
        with self._lock:
            self.seq += 1
            return self.seq

    def event(self, kind: str, **fields: Any) -> None:
        body = {
            "v": 1,
            "fleet": self.fleet,
            "device": self.device,
            "ts": round(time.time(), 3),
            "seq": self._next_seq(),
            "event": kind,
            **fields,
        }
        self.transport.publish(self.topics.events, encode_json(body))

    def publish_state(self) -> None:
        body = {
            "v": 1,
            "fleet": self.fleet,
            "device": self.device,
            "ts": round(time.time(), 3),
            "current": self.current,
            "previous": self.previous,
            "pending": None,
            "last_failure": self.last_failure,
            "probation": self.probation,
        }
        self.transport.publish(self.topics.state, encode_json(body), retain=True)

    def send_telemetry(
        self, *, p95_ms: float = 2.0, errors: int = 0, seq: int | None = None
    ) -> int:
        """Publish one telemetry message (``seq`` given: that number, e.g. a duplicate)."""
        n = self._next_seq() if seq is None else seq
        model = (
            None
            if self.current is None
            else {k: self.current[k] for k in ("name", "version", "sequence")}
        )
        body = {
            "v": 1,
            "fleet": self.fleet,
            "device": self.device,
            "ts": round(time.time(), 3),
            "seq": n,
            "interval_s": 10.0,
            "metrics": {
                "window_s": 10.0,
                "requests": 100,
                "error_count": errors,
                "latency_ms": {"p50": p95_ms / 2, "p95": p95_ms, "p99": p95_ms * 1.5},
                "model": model,
            },
            "drift": {
                "band": "stable",
                "inputs": [{"input": "x", "psi_max": 0.02, "psi": [0.01, 0.02], "band": "stable"}],
            },
        }
        self.transport.publish(self.topics.telemetry, encode_json(body))
        return n

    def _on_desired(self, msg: Message) -> None:
        doc = json.loads(msg.payload) if msg.payload else None
        self.desired_seen.append(doc)
        if doc is None or self.silent:
            return
        bundle = doc["bundle"]
        digest = bundle["digest"]
        if self.current is not None and self.current["digest"] == digest:
            return
        # Not on the transport thread: the probation wait must not block it.
        threading.Thread(target=self._install, args=(bundle,), daemon=True).start()

    def _install(self, bundle: dict[str, Any]) -> None:
        digest = bundle["digest"]
        self.event("install-started", digest=digest, sequence=bundle["sequence"])
        if digest in self.fail_digests:
            self.last_failure = {
                "digest": digest,
                "reason": "health check failed",
                "ts": time.time(),
            }
            self.event("rolled-back", digest=digest, reason="health check failed")
            self.publish_state()
            return
        self.previous, self.current = (
            self.current,
            {k: bundle[k] for k in ("digest", "name", "version", "sequence")},
        )
        self.probation = {"digest": digest, "passed": False}
        self.event("activated", digest=digest)
        self.publish_state()
        time.sleep(self.probation_s)
        self.probation = {"digest": digest, "passed": True}
        self.event("committed", digest=digest)
        self.publish_state()


def start_devices(
    host: str, port: int, fleet: str, names: Iterable[str], **kwargs: Any
) -> list[FakeDevice]:
    return [FakeDevice(host, port, fleet, n, **kwargs).start() for n in names]


class ReportingDevice:
    """The agent's telemetry path for one device: Reporter + Outbox + MqttClient.

    Raises (start): RuntimeError when it cannot connect.
    """

    def __init__(
        self,
        host: str,
        port: int,
        fleet: str,
        device: str,
        state_dir: Path,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.device = device
        topics = Topics(fleet, device)
        self.outbox = Outbox(state_dir / f"{device}.outbox")
        self.transport = MqttClient(
            BrokerConfig(
                BrokerUrl(host, port, tls=False), backoff_initial_s=0.1, backoff_max_s=0.5
            ),
            presence=device_presence(topics),
        )
        # The timer is the test's (report()); the reporter thread sends and deletes on ack.
        self.reporter = Reporter(
            topics,
            self.outbox,
            self.transport,
            metrics=metrics,
            config=TelemetryConfig(interval_s=3600.0),
        )
        self.sent: list[int] = []

    def start(self, timeout_s: float = 10.0) -> ReportingDevice:
        self.transport.start()
        self.reporter.start()
        if not self.transport.wait_connected(timeout_s):
            raise RuntimeError(f"device {self.device} could not connect")
        return self

    def report(self) -> int:
        """One telemetry message into the outbox (sent by the reporter); its ``seq``."""
        seq = self.reporter.report_now()
        assert seq is not None, "the outbox had no room"
        self.sent.append(seq)
        return seq

    def acked(self) -> set[int]:
        """The ``seq`` of every message reported so far that the broker acknowledged."""
        assert self.outbox.stats().dropped_capacity == 0
        pending = {r.seq for r in self.outbox.pending(limit=len(self.sent) + 1)}
        return set(self.sent) - pending

    def stop(self) -> None:
        self.reporter.stop()
        self.transport.stop()
        self.outbox.close()
