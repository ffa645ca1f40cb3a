"""Heartbeats and freshness: who may sign one, when it counts, what it holds back. Pure."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest

from agent.bundle import verify_bundle
from agent.bundle.heartbeat import Heartbeat, read_heartbeat
from agent.bundle.root import TrustRoot
from agent.bundle.trust import check_desired, freshness_problem, install_policy, verify_heartbeat
from agent.errors import HeartbeatError, HeldBackError, RollbackError, RootExpiredError
from sdk.build.keys import SigningKey
from tests.support.bundles import BundleParts, make_manifest
from tests.support.trust import (
    FLEET,
    NOW,
    ONLINE,
    ONLINE_2,
    RELEASE,
    ROOT_A,
    believed,
    first_root,
    heartbeat,
    next_root,
    signed,
)

SLACK = 300.0


@pytest.fixture(scope="module")
def root() -> TrustRoot:
    """Root v1 with an online key; heartbeats valid for at most an hour."""
    return believed(signed(first_root(freshness=(ONLINE,), min_sequence={"demo": 2}), ROOT_A))


def _verify(data: bytes, root: TrustRoot, last: Heartbeat | None = None) -> Heartbeat:
    return verify_heartbeat(data, root, fleet=FLEET, now=NOW, last=last, slack_s=SLACK)


def test_a_heartbeat_signed_by_the_freshness_key_is_believed(root: TrustRoot) -> None:
    beat = _verify(heartbeat(latest={"demo": 3}), root)
    assert (beat.latest, beat.root_version) == ({"demo": 3}, 1)


@pytest.mark.parametrize(
    "key", [ROOT_A, RELEASE, ONLINE_2], ids=["root-key", "bundle-key", "stranger"]
)
def test_a_heartbeat_signed_by_a_non_freshness_key_is_refused(
    root: TrustRoot, key: SigningKey
) -> None:
    with pytest.raises(HeartbeatError, match="comes from a key trust root v1 trusts"):
        _verify(heartbeat(key=key), root)


def test_an_expired_heartbeat_is_refused(root: TrustRoot) -> None:
    old = heartbeat(issued=NOW - timedelta(hours=1), valid_for_s=600)
    with pytest.raises(HeartbeatError, match="expired at"):
        _verify(old, root)


def test_a_replayed_heartbeat_is_refused(root: TrustRoot) -> None:
    first = read_heartbeat(heartbeat(issued=NOW - timedelta(seconds=30)))
    later = read_heartbeat(heartbeat(issued=NOW))
    with pytest.raises(HeartbeatError, match="replayed"):
        _verify(first.envelope, root, last=later)
    # Same second, other content: a second heartbeat cannot be slipped in under the first.
    with pytest.raises(HeartbeatError, match="replayed"):
        _verify(heartbeat(issued=NOW, latest={"demo": 1}), root, last=later)
    assert _verify(heartbeat(issued=NOW + timedelta(seconds=1)), root, last=later)


def test_a_heartbeat_from_the_future_is_refused(root: TrustRoot) -> None:
    with pytest.raises(HeartbeatError, match="in the future"):
        _verify(heartbeat(issued=NOW + timedelta(hours=1)), root)


def test_a_heartbeat_valid_longer_than_the_root_allows_is_refused(root: TrustRoot) -> None:
    with pytest.raises(HeartbeatError, match="at most 3600"):
        _verify(heartbeat(valid_for_s=7200), root)


def test_a_heartbeat_for_another_fleet_is_refused(root: TrustRoot) -> None:
    with pytest.raises(HeartbeatError, match="fleet 'other'"):
        _verify(heartbeat(fleet="other"), root)


def test_a_root_without_a_freshness_key_takes_no_heartbeat() -> None:
    plain = believed(signed(first_root(), ROOT_A))
    with pytest.raises(HeartbeatError, match="names no freshness key"):
        _verify(heartbeat(), plain)
    assert freshness_problem(plain, None, now=NOW, slack_s=SLACK) is None


def test_a_rotated_online_key_signs_for_the_new_root_only(root: TrustRoot) -> None:
    v2 = believed(
        signed(next_root(root, remove=[ONLINE.keyid], add_freshness=[ONLINE_2.public]), ROOT_A)
    )
    with pytest.raises(HeartbeatError):
        _verify(heartbeat(key=ONLINE), v2)
    assert _verify(heartbeat(key=ONLINE_2, root_version=2), v2)


def test_a_changed_byte_of_a_heartbeat_is_refused(root: TrustRoot) -> None:
    data = heartbeat()
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0x01
        with pytest.raises(HeartbeatError):
            _verify(bytes(mutated), root)


# --- what freshness allows -----------------------------------------------------------------


def test_without_a_fresh_heartbeat_nothing_is_installed(root: TrustRoot) -> None:
    with pytest.raises(HeldBackError, match="no heartbeat"):
        install_policy(root, None, now=NOW, slack_s=SLACK, require_fresh=True)
    stale = read_heartbeat(heartbeat(issued=NOW - timedelta(hours=2)))
    with pytest.raises(HeldBackError, match="expired at"):
        check_desired(root, stale, name="demo", sequence=9, now=NOW, slack_s=SLACK)
    # A person at the device chooses the bundle: freshness is the fleet's question.
    assert install_policy(root, None, now=NOW, slack_s=SLACK, require_fresh=False)


def test_a_desired_state_older_than_the_heartbeat_says_exists_is_refused(
    root: TrustRoot,
) -> None:
    beat = read_heartbeat(heartbeat(latest={"demo": 5}))
    with pytest.raises(HeldBackError, match="held back"):
        check_desired(root, beat, name="demo", sequence=4, now=NOW, slack_s=SLACK)
    check_desired(root, beat, name="demo", sequence=5, now=NOW, slack_s=SLACK)
    check_desired(root, beat, name="other", sequence=0, now=NOW, slack_s=SLACK)


def test_a_desired_state_lying_about_its_sequence_meets_the_heartbeat_floor(
    root: TrustRoot,
) -> None:
    beat = read_heartbeat(heartbeat(latest={"demo": 5}))
    policy = install_policy(root, beat, now=NOW, slack_s=SLACK, require_fresh=True)
    old = BundleParts(manifest=make_manifest(sequence=4), keys=(RELEASE,)).to_bytes()
    with pytest.raises(RollbackError, match="the heartbeat"):
        verify_bundle(io.BytesIO(old), policy, now=NOW)


def test_a_heartbeat_naming_a_newer_root_holds_the_device_back(root: TrustRoot) -> None:
    beat = read_heartbeat(heartbeat(root_version=3))
    problem = freshness_problem(root, beat, now=NOW, slack_s=SLACK)
    assert problem is not None
    assert "v3" in problem


def test_the_signed_floor_refuses_a_desired_state_below_it(root: TrustRoot) -> None:
    beat = read_heartbeat(heartbeat())
    with pytest.raises(RollbackError, match="floor signed"):
        check_desired(root, beat, name="demo", sequence=1, now=NOW, slack_s=SLACK)


def test_an_expired_root_refuses_every_desired_state() -> None:
    expired = believed(signed(first_root(expires=NOW - timedelta(days=1)), ROOT_A))
    with pytest.raises(RootExpiredError):
        check_desired(expired, None, name="demo", sequence=9, now=NOW, slack_s=SLACK)
