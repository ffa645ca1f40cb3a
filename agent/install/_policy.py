"""The trust policy an install is verified against, when it may change over time.

A one-shot command verifies against a fixed :class:`~agent.bundle.signing.TrustPolicy`; a
device holding a trust root asks its :class:`~agent.install._trust.TrustKeeper` at the
moment of verification, because roots, key expiries and heartbeats change what is
trusted while an install is in progress.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from agent.bundle.manifest import SIGNATURE_PATH
from agent.bundle.signing import TrustPolicy
from agent.errors import ConfigError, StateError

if TYPE_CHECKING:
    from agent.bundle.root import TrustRoot
    from agent.install._store import Store

__all__ = ["PolicySource", "installed_vouch_problem", "policy_at"]

PolicySource = Callable[[datetime], TrustPolicy]


def policy_at(policy: TrustPolicy | PolicySource | None, now: datetime) -> TrustPolicy:
    """The policy in force at ``now``.

    Raises:
        ConfigError: there is none (an updater made only to report or roll back).
        TrustError: the source refuses every install now (an expired root, updates withheld).
    """
    if policy is None:
        raise ConfigError("installing needs a trust policy; give one (--trust)")
    return policy if isinstance(policy, TrustPolicy) else policy(now)


def installed_vouch_problem(
    store: Store, digest: str, root: TrustRoot, now: datetime, slack_s: float
) -> str | None:
    """Why ``root`` does not vouch for the installed version ``digest``; None if it does.

    The version's own signature file is what is judged: the one it was installed with.
    """
    from agent.bundle.trust import vouch_problem  # noqa: PLC0415 - only when the trust changed

    try:
        manifest = store.manifest(digest)
        envelope = (store.version_dir(digest) / SIGNATURE_PATH).read_bytes()
    except (OSError, StateError) as exc:
        return f"its signature cannot be read: {exc}"
    return vouch_problem(root, envelope, manifest, now=now, slack_s=slack_s)
