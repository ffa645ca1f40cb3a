"""Lowering the calling thread's CPU priority (Linux schedules threads individually).

Light on purpose: the health gate's child process calls it before it imports numpy or
a runtime, whose threads then inherit the lowered priority.
"""

from __future__ import annotations

import os

__all__ = ["lower_this_thread"]


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
