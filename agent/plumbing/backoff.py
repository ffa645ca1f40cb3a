"""How long to wait before trying again: exponential backoff with full jitter.

The ceiling doubles with every failure in a row, from ``initial_s`` up to ``max_s``, and
each wait is drawn uniformly below it ("full jitter"): a fleet of devices that lost the
broker at the same instant does not come back in lockstep. A success resets it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Waits between retries of one operation. Pure: no clock, no sleeping, no threads.

    Not thread-safe; one owner calls :meth:`next` after each failure and :meth:`reset`
    after a success. ``rand`` returns a float in [0, 1) (injectable for tests). No wait is
    shorter than ``min_s``, so a retry loop never spins.

    Raises (constructor):
        ValueError: ``initial_s`` is not positive, ``max_s`` is below it, or ``min_s``
            is negative.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        *,
        min_s: float = 0.05,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial_s <= max_s or min_s < 0:
            raise ValueError(
                f"backoff needs 0 < initial_s <= max_s and min_s >= 0,"
                f" not {initial_s}, {max_s}, {min_s}"
            )
        self.initial_s = initial_s
        self.max_s = max_s
        self.min_s = min_s
        self._rand = rand
        self._failures = 0

    @property
    def failures(self) -> int:
        """Failures in a row since the last :meth:`reset`."""
        return self._failures

    def next(self) -> float:
        """The wait after one more failure: uniform below the ceiling, which then doubles."""
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(self._failures, 64))
        self._failures += 1
        return max(self.min_s, self._rand() * ceiling)

    def reset(self) -> None:
        """After a success: the next wait starts again from ``initial_s``."""
        self._failures = 0
