"""Trust roots and heartbeats for tests: real keys (derived from labels), real signatures."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.bundle.root import TrustRoot
from sdk.build.keys import SigningKey
from sdk.fleet.trust import RoleKeys, RootChange, change_root, draft, make_heartbeat, make_root
from sdk.fleet.trust import sign_root as _sign
from tests.support.bundles import make_key

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
FLEET = "f"

ROOT_A, ROOT_B, ROOT_C = make_key("root-a"), make_key("root-b"), make_key("root-c")
ROOT_D, ROOT_E = make_key("root-d"), make_key("root-e")
RELEASE, RELEASE_2 = make_key("release"), make_key("release-2")
ONLINE, ONLINE_2 = make_key("online"), make_key("online-2")


def first_root(
    *,
    root_keys: Sequence[SigningKey] = (ROOT_A,),
    root_threshold: int = 1,
    bundle_keys: Sequence[SigningKey] = (RELEASE,),
    freshness: Sequence[SigningKey] = (),
    expires: datetime = NOW + YEAR,
    **options: Any,
) -> TrustRoot:
    """Root v1 (unsigned: sign it with :func:`signed`)."""
    keys = RoleKeys(
        root=[k.public for k in root_keys],
        bundles=[k.public for k in bundle_keys],
        freshness=[k.public for k in freshness],
    )
    return make_root(keys, expires=expires, root_threshold=root_threshold, **options)


def next_root(current: TrustRoot, expires: datetime = NOW + YEAR, **change: Any) -> TrustRoot:
    """Root N+1: ``current`` with a :class:`RootChange` made of ``change``."""
    return change_root(current, RootChange(**change), expires=expires)


def signed(root: TrustRoot, *keys: SigningKey) -> bytes:
    """The root's file, signed by ``keys``."""
    return _sign(draft(root), keys)


def believed(data: bytes) -> TrustRoot:
    """The root in a signed file, as a device holding it sees it (no verification)."""
    from agent.bundle.root import read_root  # noqa: PLC0415

    return read_root(data)[1]


def heartbeat(
    *,
    key: SigningKey = ONLINE,
    fleet: str = FLEET,
    root_version: int = 1,
    latest: dict[str, int] | None = None,
    issued: datetime = NOW,
    valid_for_s: int = 600,
) -> bytes:
    return make_heartbeat(
        key,
        fleet=fleet,
        root_version=root_version,
        latest=latest or {},
        valid_for_s=valid_for_s,
        now=issued,
    )
