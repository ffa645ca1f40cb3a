"""The fleet side: desired state, device groups, rollouts in waves, collection, reports.

Modules: ``publish`` (desired state), ``groups`` (device selection), ``rollout`` (pure
wave decisions), ``collect``, ``records`` and ``store`` (MQTT to SQLite / PostgreSQL),
``status`` and ``report`` (reading the database). ``_rollout_run`` is the I/O around
rollouts. They talk MQTT through :class:`agent.plumbing.transport.Transport` (the
agent's :class:`agent.plumbing.mqtt.MqttClient`, without device presence). See
docs/fleet.md.
"""
