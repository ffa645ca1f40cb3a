"""The errors only the build and fleet side raise.

They live outside :mod:`agent.errors` because a device never builds or rolls out
anything, but they derive from :class:`agent.errors.EdgeshipError`, so both CLIs catch and
print them like every other edgeship error.
"""

from __future__ import annotations

from agent.errors import ConfigError, EdgeshipError

__all__ = [
    "BuildError",
    "GateError",
    "ModelSignatureError",
    "PreflightError",
    "QuantizationError",
    "RolloutError",
    "RunnerBusyError",
    "StoreError",
    "StoreUnavailableError",
]


class BuildError(EdgeshipError):
    """The SDK could not produce a bundle that it is willing to sign."""


class QuantizationError(BuildError):
    """The quantizer failed on this model, or its output does not load in the runtime."""


class GateError(BuildError):
    """The candidate missed a build gate; no bundle was written.

    ``report`` holds the evaluation report that shows which gate failed and by how much.
    """

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class ModelSignatureError(BuildError):
    """The source model's signature is missing or does not verify, or the bundled model
    cannot be signed; the build stopped before it read the model."""


class RolloutError(EdgeshipError):
    """A rollout cannot start or go on; nothing was published for the step refused."""


class PreflightError(RolloutError):
    """A check before publishing failed; nothing was published.

    ``problems`` pairs what was checked (``url``, ``trust``, or a device id) with why it
    failed, so the CLI can print one line per device.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.problems = problems


class RunnerBusyError(RolloutError):
    """Another runner holds the rollout and is alive (its heartbeat is recent)."""


class StoreError(ConfigError):
    """The fleet database refused the work for good (schema, permission): waiting will not
    help; fix the database or the settings the message names. A :class:`ConfigError`, as
    every database failure was before there were these two."""


class StoreUnavailableError(StoreError):
    """The fleet database cannot be reached or is busy for now (a restart, a dropped
    connection, a lock); the collector waits it out. Retrying later may succeed."""
