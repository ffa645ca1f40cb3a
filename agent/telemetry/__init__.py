"""Telemetry: metrics, drift and lifecycle events, through a durable outbox to MQTT.

See docs/mqtt.md for topics, payloads and delivery semantics. Typical wiring::

    outbox = Outbox(state_dir / "outbox.sqlite")
    transport = ...  # an agent.plumbing.transport.Transport, e.g. the MQTT client
    reporter = Reporter(Topics(fleet, device), outbox, transport,
                        metrics=Metrics(), drift=DriftMonitor(manifest.drift_reference),
                        system=SystemSampler(state_dir))
    transport.start(); reporter.start()
    ...  metrics.record(latency_s, error); drift.observe({"x": batch}, outputs)
    reporter.emit_event("activated", sequence=7)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.plumbing.lazy import exports

if TYPE_CHECKING:
    from agent.telemetry._drift import DriftMonitor, psi, psi_band
    from agent.telemetry._metrics import LogHistogram, Metrics, MetricsSnapshot
    from agent.telemetry._observe import ObservedPredictor
    from agent.telemetry._outbox import Outbox, OutboxRecord, OutboxStats
    from agent.telemetry._reporter import EVENT_KINDS, Reporter, TelemetryConfig
    from agent.telemetry._system import SystemSampler

__all__ = [
    "EVENT_KINDS",
    "DriftMonitor",
    "LogHistogram",
    "Metrics",
    "MetricsSnapshot",
    "ObservedPredictor",
    "Outbox",
    "OutboxRecord",
    "OutboxStats",
    "Reporter",
    "SystemSampler",
    "TelemetryConfig",
    "psi",
    "psi_band",
]

__getattr__ = exports(
    __name__,
    {
        "DriftMonitor": "agent.telemetry._drift",
        "psi": "agent.telemetry._drift",
        "psi_band": "agent.telemetry._drift",
        "LogHistogram": "agent.telemetry._metrics",
        "Metrics": "agent.telemetry._metrics",
        "MetricsSnapshot": "agent.telemetry._metrics",
        "ObservedPredictor": "agent.telemetry._observe",
        "Outbox": "agent.telemetry._outbox",
        "OutboxRecord": "agent.telemetry._outbox",
        "OutboxStats": "agent.telemetry._outbox",
        "EVENT_KINDS": "agent.telemetry._reporter",
        "Reporter": "agent.telemetry._reporter",
        "TelemetryConfig": "agent.telemetry._reporter",
        "SystemSampler": "agent.telemetry._system",
    },
)
