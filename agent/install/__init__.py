"""Installing a bundle on the device: fetch, verify, stage, health-check, activate, commit.

The only part of the agent that writes the state directory. :class:`Updater` runs the
install state machine (docs/agent.md) over a :class:`Store` (versions on disk and the one
atomic state file), persisting every phase before its side effect; the health gate runs
the candidate's golden inputs in a child process at idle priority
(:func:`check_in_child`) before it serves; :class:`DesiredFollower` installs what the
fleet's desired state names, in one background worker. Faults are injected in tests only
through :mod:`agent.install.faults`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.plumbing.lazy import exports

if TYPE_CHECKING:
    from agent.install._config import FetchConfig, UpdateConfig, UpdaterConfig
    from agent.install._fetch import Fetcher, UrlFetcher
    from agent.install._follower import DesiredFollower
    from agent.install._gate import ChildGate, check_in_child, load_and_check
    from agent.install._health import HealthReport, check_health
    from agent.install._loading import ModelLoader
    from agent.install._status import status_document
    from agent.install._store import AgentState, Failure, Pending, Store
    from agent.install._updater import EventSink, InstallResult, Updater
    from agent.plumbing.sched import GatePriority

__all__ = [
    "AgentState",
    "ChildGate",
    "DesiredFollower",
    "EventSink",
    "Failure",
    "FetchConfig",
    "Fetcher",
    "GatePriority",
    "HealthReport",
    "InstallResult",
    "ModelLoader",
    "Pending",
    "Store",
    "UpdateConfig",
    "Updater",
    "UpdaterConfig",
    "UrlFetcher",
    "check_health",
    "check_in_child",
    "load_and_check",
    "status_document",
]

__getattr__ = exports(
    __name__,
    {
        "FetchConfig": "agent.install._config",
        "UpdateConfig": "agent.install._config",
        "UpdaterConfig": "agent.install._config",
        "Fetcher": "agent.install._fetch",
        "UrlFetcher": "agent.install._fetch",
        "DesiredFollower": "agent.install._follower",
        "ChildGate": "agent.install._gate",
        "check_in_child": "agent.install._gate",
        "load_and_check": "agent.install._gate",
        "HealthReport": "agent.install._health",
        "check_health": "agent.install._health",
        "GatePriority": "agent.plumbing.sched",
        "status_document": "agent.install._status",
        "AgentState": "agent.install._store",
        "Failure": "agent.install._store",
        "Pending": "agent.install._store",
        "Store": "agent.install._store",
        "EventSink": "agent.install._updater",
        "InstallResult": "agent.install._updater",
        "ModelLoader": "agent.install._loading",
        "Updater": "agent.install._updater",
    },
)
