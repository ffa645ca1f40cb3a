"""The lease that lets one runner drive a rollout: who holds it, and the holder's side.

Creating a rollout, or taking one over (:class:`~sdk.fleet._rollout_store.RolloutRecords`),
writes the runner's id and a heartbeat into the rollout's row. The :class:`Runner`
refreshes the heartbeat from a thread every quarter of the plan's ``runner_timeout_s``,
and every write of the record is fenced on holding the lease (``WHERE runner = <me>``):
a runner that lost it (it stalled past the timeout and another took over) cannot write,
and stops before publishing more. A runner whose heartbeat is older than the timeout, or
that let go, is *gone*; only then may another take over.

The heartbeat compares clocks of different hosts: they are assumed to be synchronised
(NTP) to well within the timeout.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError
from sdk.errors import RolloutError
from sdk.fleet.rollout import Rollout

if TYPE_CHECKING:
    from sdk.fleet._rollout_store import RolloutRecords

__all__ = ["Runner", "RunnerInfo", "lost_lease", "new_holder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerInfo:
    """Who drives a rollout, and whether it is still there."""

    holder: str | None  # None: it let go
    since: float | None  # when it took the lease
    heartbeat_at: float | None  # its last heartbeat (or when it let go)
    timeout_s: float

    def alive(self, now: float) -> bool:
        return (
            self.holder is not None
            and self.heartbeat_at is not None
            and now - self.heartbeat_at <= self.timeout_s
        )

    def describe(self, now: float) -> str:
        """One line for ``rollout status``: the runner, or since when there is none."""
        if self.heartbeat_at is None:
            return "none"
        age = f"{max(0.0, now - self.heartbeat_at):.1f}s"
        if self.alive(now):
            return f"{self.holder} (last heartbeat {age} ago)"
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.heartbeat_at))
        if self.holder is None:
            return f"none since {since} ({age} ago, when the last runner stopped)"
        return f"{self.holder} gone since {since} (no heartbeat for {age})"

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "holder": self.holder,
            "since": self.since,
            "heartbeat_at": self.heartbeat_at,
            "timeout_s": self.timeout_s,
            "alive": self.alive(now),
        }


def new_holder() -> str:
    """A runner's id: host, process and a random part (a pid is reused after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def lost_lease(rollout_id: str) -> str:
    """What a runner that lost its lease says."""
    return (
        f"this runner lost rollout {rollout_id} to another one (its heartbeat was late: the"
        " process was stopped or starved for longer than the runner timeout); it stops here"
    )


class Runner:
    """This process's lease on one rollout: ``with`` it to heartbeat and, at the end, let go.

    :meth:`save` writes the record only while the lease is held.
    """

    def __init__(self, records: RolloutRecords, rollout: Rollout, holder: str) -> None:
        self.records = records
        self.rollout = rollout  # as last saved
        self.holder = holder
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"rollout-{rollout.id}-heartbeat", daemon=True
        )

    def __enter__(self) -> Runner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if not self.lost.is_set():
            try:
                self.records.release(self.rollout.id, self.holder)
            except ConfigError as e:  # the lease then runs out by itself
                log.warning("could not let go of rollout %s: %s", self.rollout.id, e)

    def _beat(self) -> None:
        interval = self.rollout.plan.runner_timeout_s / 4
        while not self._stop.wait(interval):
            try:
                if not self.records.heartbeat(self.rollout.id, self.holder):
                    self.lost.set()
                    return
            except ConfigError as e:  # a database hiccup: the next beat may get through
                log.warning("rollout %s heartbeat failed: %s", self.rollout.id, e)

    def save(self, rollout: Rollout) -> bool:
        """Write ``rollout``; False when it was aborted meanwhile (nothing written).

        Raises:
            RolloutError: the lease is lost.
            ConfigError: the database failed.
        """
        if self.lost.is_set():
            raise RolloutError(lost_lease(rollout.id))
        if not self.records.write(rollout, self.rollout, self.holder):
            return False
        self.rollout = rollout
        return True

    def aborted(self) -> bool:
        """Whether another process aborted the rollout.

        Raises:
            RolloutError: the lease is lost.
        """
        if self.lost.is_set():
            raise RolloutError(lost_lease(self.rollout.id))
        return self.records.status_of(self.rollout.id) == "aborted"

    def reload(self) -> Rollout:
        """The record as stored now (another process may have aborted it).

        Raises:
            ConfigError: the database failed.
        """
        self.rollout = self.records.load(self.rollout.id)[0]
        return self.rollout
