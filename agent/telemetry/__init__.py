"""Telemetry: metrics, drift and lifecycle events, through a durable outbox to MQTT.

See docs/mqtt.md for topics, payloads and delivery semantics. Typical wiring::

    outbox = Outbox(state_dir / "outbox.sqlite")
    transport = MqttTransport(MqttConfig(host, port, fleet, device, tls=...))
    reporter = Reporter(Topics(fleet, device), outbox, transport,
                        metrics=Metrics(), drift=DriftMonitor(manifest.drift_reference),
                        system=SystemSampler(state_dir))
    transport.start(); reporter.start()
    ...  metrics.record(latency_s, error); drift.observe({"x": batch}, outputs)
    reporter.emit_event("activated", sequence=7)
"""

from __future__ import annotations

from agent.telemetry._drift import DriftMonitor, psi, psi_band
from agent.telemetry._metrics import LogHistogram, Metrics, MetricsSnapshot
from agent.telemetry._outbox import Outbox, OutboxRecord, OutboxStats
from agent.telemetry._reporter import EVENT_KINDS, Reporter, ReporterConfig
from agent.telemetry._system import SystemSampler

__all__ = [
    "EVENT_KINDS",
    "DriftMonitor",
    "LogHistogram",
    "Metrics",
    "MetricsSnapshot",
    "Outbox",
    "OutboxRecord",
    "OutboxStats",
    "Reporter",
    "ReporterConfig",
    "SystemSampler",
    "psi",
    "psi_band",
]
