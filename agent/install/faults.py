"""The one seam for fault injection: crash and gate-fault tests, off unless a test sets it.

Crash tests need the agent to die at an exact step of an install, as a real process,
without timing games; gate tests need a candidate that crashes, hangs or spins in the
health gate's child process. Both are driven by environment variables that only tests
set, and read here and nowhere else:

``EDGESHIP_CRASH_AT=<point>``
    The process SIGKILLs itself when the install reaches ``<point>``, one of
    :data:`CRASH_POINTS`: right after each phase is persisted (``downloading``,
    ``verifying``, ``staged``, ``health-check``, ``probation``, ``committed``) and
    between the side effects inside a step (``downloaded``, ``extracted``, ``adopted``,
    ``collected``).
``EDGESHIP_TEST_GATE_FAULT=crash|hang|spin``
    The health gate's child process aborts, sleeps, or spins on a CPU instead of
    checking the candidate.

With neither set (every real deployment), :func:`crash_point` is one dictionary lookup.
The fleet side's rollout runner stops through the same seam, at its own points
(:data:`sdk.fleet._rollout_run.CRASH_POINTS`).
"""

from __future__ import annotations

import os
import signal

__all__ = [
    "CRASH_ENV",
    "CRASH_POINTS",
    "GATE_FAULTS",
    "GATE_FAULT_ENV",
    "crash_point",
    "gate_fault",
]

CRASH_ENV = "EDGESHIP_CRASH_AT"
CRASH_POINTS = (
    "downloading",
    "downloaded",
    "verifying",
    "extracted",
    "adopted",
    "staged",
    "health-check",
    "probation",
    "committed",
    "collected",
)
GATE_FAULT_ENV = "EDGESHIP_TEST_GATE_FAULT"
GATE_FAULTS = ("crash", "hang", "spin")


def crash_point(name: str) -> None:
    """SIGKILL this process if the crash test asked for ``name``."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def gate_fault() -> str | None:
    """The fault the gate's child process should simulate, if a test asked for one."""
    fault = os.environ.get(GATE_FAULT_ENV)
    return fault if fault in GATE_FAULTS else None
