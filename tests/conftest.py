"""Shared test configuration. Fixture modules live in tests/support/."""

# Real peers for integration tests: a mosquitto broker (and a throwaway PKI), and a
# private PostgreSQL instance.
pytest_plugins = ["tests.support.broker", "tests.support.postgres"]
