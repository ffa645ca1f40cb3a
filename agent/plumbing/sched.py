"""Linux scheduling for the health gate: lowering a thread's CPU priority, and CPU accounting.

Light on purpose: the health gate's child process lowers its priority before it imports
numpy or a runtime, whose threads then inherit the lowered priority.

Threads inherit their creator's priority, and an unprivileged process can never raise it
again; :func:`spawned_lowered` tells whether a runtime started threads at a lowered
priority (they would serve at it for the model's whole life). ``/proc/<tid>/schedstat``
tells how long a thread ran and how long it waited for a CPU, which the gate uses to time
a model fairly on a busy device and to explain a gate that timed out.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar, Union

__all__ = [
    "CAN_LOWER",
    "GatePriority",
    "check_priority",
    "cpu_and_wait_s",
    "cpu_wait_s",
    "in_lowered_thread",
    "lower_this_thread",
    "model_clocks",
    "spawned_lowered",
    "thread_ids",
]

T = TypeVar("T")

GatePriority = Union[Literal["idle", "normal"], int]
"""CPU priority of the health gate: Linux ``SCHED_IDLE``, unchanged, or a nice increment."""

# Lowering one thread's priority needs Linux's per-thread scheduling and /proc to see
# which threads a runtime started; elsewhere the gate runs at normal priority.
CAN_LOWER = sys.platform.startswith("linux") and hasattr(os, "sched_setscheduler")


def lower_this_thread(priority: object) -> None:
    """``"idle"``: Linux ``SCHED_IDLE``; a positive int: that much nicer; else nothing.

    An unprivileged thread can always lower its priority but never raise it again, and
    threads it starts later inherit it. Where it is not permitted or not supported, the
    thread keeps its priority.
    """
    try:
        if priority == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        elif isinstance(priority, int) and not isinstance(priority, bool) and priority > 0:
            # PRIO_PROCESS with 0 is the calling thread on Linux.
            os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + priority)
    except (OSError, AttributeError):  # not permitted, or not Linux
        pass


def check_priority(value: object) -> GatePriority:
    """Validate a configured gate priority. Raises ValueError."""
    # One literal at a time: mypy before 1.20 (the last on 3.9) narrows only this way.
    if value == "idle":
        return "idle"
    if value == "normal":
        return "normal"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 19:
        return value
    raise ValueError(f'must be "idle", "normal" or a nice increment 1-19, not {value!r}')


def _schedstat(path: str) -> tuple[int, int] | None:
    """(nanoseconds on a CPU, nanoseconds runnable but waiting) of one thread, if known."""
    try:
        with open(path, "rb") as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_wait_s() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU, if known.

    Linux reports it in ``/proc/thread-self/schedstat``; elsewhere this is 0.0.
    """
    stat = _schedstat("/proc/thread-self/schedstat")
    return 0.0 if stat is None else stat[1] / 1e9


def _wall_minus_wait() -> float:
    return time.perf_counter() - cpu_wait_s()


def model_clocks() -> tuple[Callable[[], float], ...]:
    """Clocks for timing a model in a process of its own that may wait for CPUs.

    A run takes the smaller of two measures that can each only overstate what the model
    needs on its own: wall time minus the calling thread's wait for a CPU (the runtime's
    worker threads may still have waited), and the CPU time of the whole process (work
    spread over several threads is summed).
    """
    return (_wall_minus_wait, time.process_time)


def cpu_and_wait_s(pid: int) -> tuple[float, float] | None:
    """Seconds a live process's threads have run, and waited runnable for a CPU."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    stats = [_schedstat(f"/proc/{pid}/task/{tid}/schedstat") for tid in tids]
    known = [st for st in stats if st is not None]
    if not known:
        return None
    return sum(st[0] for st in known) / 1e9, sum(st[1] for st in known) / 1e9


def thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []


def _lowered(tid: int, reference: int) -> bool:
    """Whether thread ``tid`` runs at a lower priority than thread ``reference``."""
    try:
        if os.sched_getscheduler(tid) == os.SCHED_IDLE != os.sched_getscheduler(reference):
            return True
        return os.getpriority(os.PRIO_PROCESS, tid) > os.getpriority(os.PRIO_PROCESS, reference)
    except OSError:  # the thread has ended: it serves nothing
        return False


def spawned_lowered(before: set[int], reference: int) -> bool:
    """Whether a thread started after ``before`` was listed runs below ``reference``'s priority.

    Such a thread inherited the gate's lowered priority: any other thread of the process
    is started by a thread at normal priority.
    """
    return any(_lowered(tid, reference) for tid in thread_ids() if tid not in before)


def in_lowered_thread(
    fn: Callable[[], T], priority: Literal["idle"] | int, *, known: set[int] | None = None
) -> T:
    """Run ``fn`` in a fresh thread at ``priority``; its id is added to ``known``."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        lower_this_thread(priority)
        try:
            results.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, re-raised there
            errors.append(exc)

    # Lowering a thread's priority is always allowed; raising it back is not (without
    # CAP_SYS_NICE), hence a fresh thread for each use instead of re-prioritising this one.
    worker = threading.Thread(target=run, name="edgeship-health-gate")
    worker.start()
    if known is not None and worker.native_id is not None:
        known.add(worker.native_id)  # its OS thread may linger a moment after join()
    worker.join()
    if errors:
        raise errors[0]
    return results[0]
