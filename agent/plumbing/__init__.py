"""The plumbing under both agent and SDK: one of each, used everywhere.

:mod:`~agent.plumbing.mqtt` (the MQTT client) and :mod:`~agent.plumbing.transport` (the
small interface telemetry and serving publish through), :mod:`~agent.plumbing.broker`
(broker URLs), :mod:`~agent.plumbing.tls` (TLS clients), :mod:`~agent.plumbing.files`
(atomic writes), :mod:`~agent.plumbing.backoff` (retries with jitter),
:mod:`~agent.plumbing.stats` (the one percentile definition) and
:mod:`~agent.plumbing.lazy` (public faces that import on first use). Each module is
public and imported by name; nothing here imports another part of the agent.
"""
