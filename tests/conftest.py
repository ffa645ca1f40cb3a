"""Shared test configuration. Fixture modules live in tests/support/."""

# The real mosquitto broker (and a throwaway PKI) for every integration test.
pytest_plugins = ["tests.support.broker"]
