"""The fleet side: desired state, device groups, rollouts in waves, collection, reports.

Modules: ``publish`` (desired state), ``groups`` (device selection), ``rollout`` (pure
wave decisions), ``collect``, ``records`` and ``store`` (MQTT to SQLite / PostgreSQL),
``status`` and ``report`` (reading the database); the store's tables are
``_migrations``. The I/O around rollouts is private: ``_rollout_run`` (the runner),
``_preflight``, ``_reported`` (device reports, pure), ``_ab`` (the A/B verdict, pure),
``_rollout_store`` and ``_rollout_lease`` (records and the one runner, in the store).
They talk MQTT through :class:`agent.plumbing.transport.Transport` (the agent's
:class:`agent.plumbing.mqtt.MqttClient`, without device presence). See docs/fleet.md.
"""
