"""The agent's state as a JSON document: the one view shared by the CLI and the daemon.

``edgeship-agent status --json`` prints it, and the daemon publishes it (plus what only a
running agent knows: the probation verdict and the desired digest) as the retained
``state`` message (docs/mqtt.md). Stored versions are named by their manifests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.errors import StateError
from agent.install._store import AgentState, Store

__all__ = ["status_document", "version_info"]


def version_info(store: Store, digest: str | None) -> dict[str, Any] | None:
    """Digest, name, version and sequence of a stored version (None fields: not in the store)."""
    if digest is None:
        return None
    try:
        m = store.manifest(digest)
    except StateError:
        return {"digest": digest, "name": None, "version": None, "sequence": None}
    return {"digest": digest, "name": m.name, "version": m.version, "sequence": m.sequence}


def status_document(
    store: Store,
    state: AgentState,
    *,
    probation: Mapping[str, Any] | None = None,
    desired_digest: str | None = None,
    trust: Mapping[str, Any] | None = None,
    serving: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The state as a JSON-ready document: pending and last failure as ``state.json`` holds
    them, versions named by their manifests, the device's trust (its root version,
    whether updates are held back: :meth:`agent.install._trust.TrustKeeper.document`) and
    what serves (its digest, runtime and provider)."""
    return {
        "current": version_info(store, state.current),
        "previous": version_info(store, state.previous),
        "pending": None if state.pending is None else state.pending.to_json(),
        "floor": state.floor,
        "attempts": dict(state.attempts),
        "last_failure": None if state.last_failure is None else state.last_failure.to_json(),
        "probation": None if probation is None else dict(probation),
        "desired_digest": desired_digest,
        "trust": None if trust is None else dict(trust),
        "serving": None if serving is None else dict(serving),
    }
