"""The health gate's worker processes, and one kept warm for the next check.

A worker is a child Python process (:mod:`agent.install._gate_child`): it lowers its own
CPU priority, imports numpy and the runtime, says ``ready`` on stdout and waits for one
request (:func:`agent.install._gate.check_in_child`). Starting an interpreter and importing
a runtime is most of a gate's time on a busy device: at idle priority, on the CPU time the
serving threads leave, it takes seconds. So :class:`GateWorkers` keeps one worker started
ahead of the next check: the first check starts its worker on demand, and each check, once
its worker has answered (or died), starts a replacement that warms up in the background.

Each worker checks exactly one candidate, then exits: nothing of a candidate (its memory,
a runtime it crashed or left threads in) reaches the next check, and a worker that crashed
or hung is simply not reused.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from agent.errors import HealthCheckError
from agent.plumbing.sched import GatePriority

__all__ = ["GateWorkers", "start_worker"]

_log = logging.getLogger("agent.install._health")

# The directory holding the `agent` package, for the worker's import path.
_ROOT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = (
    f"import sys; sys.path.insert(0, {_ROOT!r}); from agent.install._gate_child import main; main()"
)


def start_worker(runtime: str, priority: GatePriority) -> subprocess.Popen[str]:
    """Start a gate worker that lowers itself to ``priority`` and imports ``runtime``.

    Raises:
        HealthCheckError: there is no Python interpreter to run it (a frozen application),
            or it cannot be started.
    """
    if not sys.executable or getattr(sys, "frozen", False):
        raise HealthCheckError(
            "no Python interpreter to run the health check process in (a frozen or embedded"
            ' application); set update.health_gate = "thread"'
        )
    try:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-c", _BOOTSTRAP, str(priority), runtime, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        raise HealthCheckError(f"cannot start the health check process: {exc}") from exc


@dataclass
class _Warm:
    proc: subprocess.Popen[str]
    priority: GatePriority
    ready: bool = False  # it said so: its interpreter is up and the runtime imported


class GateWorkers:
    """At most one gate worker started ahead of time, for the next check.

    Nothing is started until asked (:meth:`warm_up`, which
    :func:`~agent.install._gate.check_in_child` calls after each check): an agent that
    never installs anything has no worker. A warm worker is a separate process at the
    gate's lowered priority, waiting on a pipe; it exits when the agent dies. Call
    :meth:`close` when the agent stops (it is also called when the object is collected,
    and at interpreter exit).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        # At most one; a list the finalizer shares, so that it stops what is there then.
        self._warm: list[_Warm] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._warm, os.getpid())
        self.warm_served = 0  # checks served by a worker started ahead
        self.started_on_demand = 0  # checks that found none and started their own

    def take(self, runtime: str, priority: GatePriority) -> subprocess.Popen[str]:
        """A worker for one check: the one started ahead, else one started now.

        The warm worker serves any runtime (it imports another one when asked), and is
        used even while it is still starting: it is further along than a new one, which
        would compete with it for the same idle CPU time. One at another priority (it can
        never raise its own) or one that died is stopped and replaced by a new one.

        Raises:
            HealthCheckError: no worker can be started (see :func:`start_worker`).
        """
        with self._lock:
            warm = self._warm.pop() if self._warm else None
            usable = warm is not None and warm.priority == priority and warm.proc.poll() is None
            if usable:
                self.warm_served += 1
            else:
                self.started_on_demand += 1
        if warm is not None:
            if usable:
                _log.debug("health check in the worker started ahead, pid %d", warm.proc.pid)
                return warm.proc
            _stop(warm.proc)
        return start_worker(runtime, priority)

    def warm_up(self, runtime: str, priority: GatePriority) -> None:
        """Start a worker for the next check in the background, unless one is there.

        It does nothing once closed, or where no worker can be started (the next check
        says why).
        """
        with self._lock:
            if self._closed or self._warm:
                return
            try:
                self._warm.append(_Warm(start_worker(runtime, priority), priority))
            except HealthCheckError as exc:
                _log.debug("no gate worker started ahead: %s", exc)

    def wait_ready(self, timeout_s: float) -> int | None:
        """Wait until the warm worker has started up; its pid, or None (none, or died).

        For benchmarks and tests, which want the next check to find it ready; a check
        never waits for this (and :meth:`take` waits for it to return).
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            warm = self._warm[0] if self._warm else None
            while warm is not None and not warm.ready:
                left = deadline - time.monotonic()
                assert warm.proc.stdout is not None  # started with a pipe
                fd = warm.proc.stdout.fileno()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    return None
                # The worker writes nothing else before its request ("ready", or end of
                # file if it died); the answer is read later from the same pipe.
                warm.ready = os.read(fd, 64) != b""
                if not warm.ready:
                    return None
        return None if warm is None else warm.proc.pid

    def close(self) -> None:
        """Stop the worker started ahead, if any, and start none from now on.

        Checks after this start their worker on demand. A check in progress keeps its
        worker to the end (the check reaps it).
        """
        with self._lock:
            self._closed = True
            self._finalizer()


def _stop(proc: subprocess.Popen[str]) -> None:
    """Kill and reap a worker: it holds no state, and leaves no zombie behind."""
    proc.kill()
    proc.communicate()


def _stop_all(warm: list[_Warm], owner: int) -> None:
    if os.getpid() != owner:  # a forked copy of the agent: not its workers to stop
        return
    while warm:
        _stop(warm.pop().proc)
