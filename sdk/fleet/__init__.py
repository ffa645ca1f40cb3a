"""The fleet side: desired state, device groups, rollouts in waves, collection, reports.

Modules: ``publish`` (desired state), ``groups`` (device selection), ``rollout`` (pure
wave decisions), ``collect`` and ``store`` (MQTT to SQLite / PostgreSQL), ``status`` and
``report`` (reading the database). ``_client`` is the fleet's MQTT connection and
``_rollout_run`` the I/O around rollouts. See docs/fleet.md.
"""
