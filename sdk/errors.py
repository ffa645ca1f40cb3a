"""The errors only the build side raises.

They live outside :mod:`agent.errors` because a device never builds anything, but they
derive from :class:`agent.errors.EdgeshipError`, so both CLIs catch and print them like
every other edgeship error.
"""

from __future__ import annotations

from agent.errors import EdgeshipError

__all__ = ["BuildError", "GateError", "QuantizationError"]


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
