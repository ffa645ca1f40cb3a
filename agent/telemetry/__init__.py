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

from agent.telemetry.drift import DriftMonitor, psi, psi_band
from agent.telemetry.metrics import LogHistogram, Metrics, MetricsSnapshot
from agent.telemetry.mqtt import MqttConfig, MqttTransport
from agent.telemetry.outbox import Outbox, OutboxRecord, OutboxStats
from agent.telemetry.reporter import EVENT_KINDS, Reporter, ReporterConfig
from agent.telemetry.system import SystemSampler
from agent.telemetry.topics import SCHEMA_VERSION, Topics
from agent.telemetry.transport import Message, Transport
from agent.tls import TlsConfig

__all__ = [
    "EVENT_KINDS",
    "SCHEMA_VERSION",
    "DriftMonitor",
    "LogHistogram",
    "Message",
    "Metrics",
    "MetricsSnapshot",
    "MqttConfig",
    "MqttTransport",
    "Outbox",
    "OutboxRecord",
    "OutboxStats",
    "Reporter",
    "ReporterConfig",
    "SystemSampler",
    "TlsConfig",
    "Topics",
    "Transport",
    "psi",
    "psi_band",
]
