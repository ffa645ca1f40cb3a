"""Shared test configuration. Fixture modules live in tests/support/."""

# Real peers for integration tests: a mosquitto broker (and a throwaway PKI), a private
# PostgreSQL instance, and `edgeship collect` as a subprocess.
pytest_plugins = ["tests.support.broker", "tests.support.collector", "tests.support.postgres"]
