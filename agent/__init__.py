"""edgeship device agent: verify, install, serve and watch models on the device.

Laid out by the steps of the flow (docs/architecture.md)::

    agent.bundle     the bundle format and its verification: pure, the trust core
    agent.install    fetch, store, health gate, install state machine, desired state
    agent.serve      runtimes, the validated model, hot swap, probation, HTTP and MQTT
    agent.telemetry  metrics, drift, events, the durable outbox, the reporter
    agent.messages   the MQTT topics and the documents agent and fleet exchange
    agent.plumbing   one of each, shared with the SDK: MQTT client, files, stats, ...
    agent.config     agent.toml, read once into the parts' own dataclasses
    agent.daemon     Agent: the wiring
    agent.cli        edgeship-agent

This package never imports :mod:`sdk` or any build-only package, and imports what a
configuration does not use only when it is used.
"""

__version__ = "0.1.0"
