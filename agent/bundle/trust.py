"""The rules of trust, after TUF: when a device believes a new root, a heartbeat, a release.

Pure: bytes, the device's current root (and last heartbeat) and ``now`` in; a verified
document or a typed :class:`~agent.errors.TrustError` out. Nothing here reads a file, the
network or a clock; :mod:`agent.install._trust` does that around these functions.

* A root: :func:`verify_root` accepts version N+1 only, signed by a threshold of root N's
  root keys and a threshold of its own (TUF 5.3.4-5.3.5); :func:`walk_chain` applies
  several in order. Key expiry does not apply to root signatures and an expired root may
  still be superseded (TUF: the chain is walked, then the last root's expiry decides).
* A heartbeat: :func:`verify_heartbeat`: signed by a threshold of the root's freshness
  keys and no other, for this fleet, issued no later than now, valid no longer than the
  root allows, unexpired, and newer than the last one (TUF's timestamp role).
* An install: :func:`install_policy` (what a bundle must satisfy now: unexpired keys,
  scopes, the signed floors and, with a fresh heartbeat, its latest releases) and
  :func:`check_desired` (whether to fetch a desired bundle at all).
* A running version: :func:`vouch_problem` says why the root no longer vouches for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from agent.bundle.heartbeat import HEARTBEAT_PAYLOAD_TYPE, Heartbeat, heartbeat_envelope
from agent.bundle.manifest import PAYLOAD_TYPE, Manifest, format_time
from agent.bundle.root import (
    ROOT_PAYLOAD_TYPE,
    TrustRoot,
    claimed_version,
    read_root,
    root_envelope,
)
from agent.bundle.signing import Envelope, TrustPolicy, check_signatures
from agent.errors import (
    BundleError,
    HeartbeatError,
    HeldBackError,
    RollbackError,
    RootError,
    RootExpiredError,
    RootVersionError,
)

__all__ = [
    "check_desired",
    "freshness_problem",
    "install_policy",
    "verify_bootstrap",
    "verify_heartbeat",
    "verify_root",
    "vouch_problem",
    "walk_chain",
]


def verify_root(data: bytes, trusted: TrustRoot, *, fleet: str | None = None) -> TrustRoot:
    """Believe root version N+1 (``data``) on the strength of root N (``trusted``). Pure.

    Order: size cap; canonical envelope of a root; the version it claims (that one field,
    to refuse at once what is not newer and to tell a gap in the chain); root N's root
    keys (threshold) over the envelope; only then the document, strictly; its own root
    keys (threshold); its fleet. Its expiry is not checked here: a device walks through
    expired roots to the newest one, whose expiry then decides what may be installed.

    Raises:
        RootVersionError: not version N+1 (replayed, lowered, or versions missing).
        RootError: malformed, too few signatures of either root's keys, another fleet.
    """
    envelope = root_envelope(data)
    version = claimed_version(envelope)
    if version <= trusted.version:
        raise RootVersionError(
            f"trust root v{version} is not newer than this device's v{trusted.version}:"
            " a replayed or lowered root is refused"
        )
    if version > trusted.version + 1:
        raise RootVersionError(
            f"trust root v{version} cannot be checked against v{trusted.version}: the"
            f" roots in between (v{trusted.version + 1} to v{version - 1}) are needed"
            " first (the bundle server's root/N.json)"
        )
    _signed_by(envelope, trusted, version, f"its predecessor ({trusted.label})")
    new = TrustRoot.from_payload(envelope.payload, data)
    _signed_by(envelope, new, version, "itself")
    if fleet is not None and new.fleet not in (None, fleet):
        raise RootError(f"trust root v{new.version} is for fleet {new.fleet!r}, not {fleet!r}")
    return new


def _signed_by(envelope: Envelope, signer: TrustRoot, version: int, what: str) -> None:
    """Raises: RootError: fewer than ``signer``'s root threshold of its root keys signed."""
    try:
        check_signatures(
            envelope, signer.role_policy(signer.root), ROOT_PAYLOAD_TYPE, what="trust root"
        )
    except BundleError as exc:
        raise RootError(
            f"trust root v{version} is not signed by enough root keys of {what}: {exc};"
            " a rotation needs a threshold of the old root keys and of the new ones"
        ) from None


def walk_chain(trusted: TrustRoot, chain: Iterable[bytes], *, fleet: str | None) -> TrustRoot:
    """Apply roots N+1, N+2, ... in order; the last one verified. Pure.

    Raises:
        RootError: as :func:`verify_root`, for the first link that fails (nothing after
            it is looked at; the roots before it were sound).
    """
    for data in chain:
        trusted = verify_root(data, trusted, fleet=fleet)
    return trusted


def verify_bootstrap(data: bytes) -> TrustRoot:
    """A root a device starts from: believed as given, but it must be signed by a threshold
    of its own root keys (a damaged or hand-edited file is caught). Pure.

    Raises:
        RootError: malformed or not signed by its own root keys.
    """
    envelope, root = read_root(data)
    try:
        check_signatures(envelope, root.role_policy(root.root), ROOT_PAYLOAD_TYPE, what="root")
    except BundleError as exc:
        raise RootError(f"{root.label} is not signed by its own root keys: {exc}") from None
    return root


def verify_heartbeat(
    data: bytes,
    root: TrustRoot,
    *,
    fleet: str,
    now: datetime,
    last: Heartbeat | None,
    slack_s: float,
) -> Heartbeat:
    """Believe a heartbeat under ``root``, given the last one believed. Pure.

    Order: size cap, canonical envelope, the freshness keys' signatures (threshold; keys
    of other roles never count), the document, fleet, issued time (not in the future,
    beyond ``slack_s``), validity (at most the root's ``max_validity_s``), expiry, and
    replay (issued after the last heartbeat; the same bytes again change nothing).

    Raises:
        HeartbeatError: any of these fails.
    """
    if root.freshness is None:
        raise HeartbeatError(
            f"{root.label} names no freshness key: heartbeats are not used by this device"
        )
    envelope = heartbeat_envelope(data)
    try:
        policy = root.role_policy(root.freshness, now=now, slack_s=slack_s)
        check_signatures(envelope, policy, HEARTBEAT_PAYLOAD_TYPE, what="heartbeat")
    except (BundleError, RootExpiredError) as exc:  # expired: every freshness key has
        raise HeartbeatError(f"heartbeat refused: {exc}") from None
    beat = Heartbeat.from_payload(envelope.payload, data)
    _check_heartbeat(beat, root, fleet=fleet, now=now, last=last, slack_s=slack_s)
    return beat


def _check_heartbeat(
    beat: Heartbeat,
    root: TrustRoot,
    *,
    fleet: str,
    now: datetime,
    last: Heartbeat | None,
    slack_s: float,
) -> None:
    assert root.freshness is not None  # the caller checked
    slack = timedelta(seconds=slack_s)
    if beat.fleet != fleet:
        raise HeartbeatError(f"the heartbeat is for fleet {beat.fleet!r}, not {fleet!r}")
    if beat.issued > now + slack:
        raise HeartbeatError(
            f"the heartbeat was issued at {format_time(beat.issued)}, in the future: check the"
            " clocks of the signer and the device"
        )
    validity = (beat.expires - beat.issued).total_seconds()
    if validity > root.freshness.max_validity_s:
        raise HeartbeatError(
            f"the heartbeat is valid for {validity:.0f} s; {root.label} allows at most"
            f" {root.freshness.max_validity_s} s"
        )
    if now - slack > beat.expires:
        raise HeartbeatError(f"the heartbeat expired at {format_time(beat.expires)}")
    if last is not None and beat.issued <= last.issued:
        raise HeartbeatError(
            f"the heartbeat issued at {format_time(beat.issued)} is not newer than the one"
            f" this device holds ({format_time(last.issued)}): a replayed heartbeat is refused"
        )


def _fresh(beat: Heartbeat | None, now: datetime, slack_s: float) -> Heartbeat | None:
    if beat is None or now - timedelta(seconds=slack_s) > beat.expires:
        return None
    return beat


def freshness_problem(
    root: TrustRoot, beat: Heartbeat | None, *, now: datetime, slack_s: float
) -> str | None:
    """Why this device cannot tell it is up to date, or None. Pure.

    None when the root names no freshness key (nothing to check) or the last heartbeat is
    fresh and names no newer root than the device holds.
    """
    if root.freshness is None:
        return None
    if beat is None:
        return (
            f"no heartbeat signed by the freshness key of {root.label} has arrived: updates"
            " may be withheld"
        )
    if _fresh(beat, now, slack_s) is None:
        return (
            f"the latest heartbeat expired at {format_time(beat.expires)}: updates may be"
            " withheld (is `edgeship heartbeat` running?)"
        )
    if beat.root_version > root.version:
        return (
            f"the heartbeat names trust root v{beat.root_version} but this device holds"
            f" v{root.version}: the newer roots have not reached it"
        )
    return None


def install_policy(
    root: TrustRoot,
    beat: Heartbeat | None,
    *,
    now: datetime,
    slack_s: float,
    require_fresh: bool,
) -> TrustPolicy:
    """What a bundle must satisfy to be installed now. Pure.

    The root's bundle policy (unexpired keys, scopes, signed floors); with
    ``require_fresh`` (a device following the fleet, not a person at the device), a fresh
    heartbeat when the root names a freshness key, whose latest releases then count as
    floors too: a bundle older than what exists is being pushed on the device.

    Raises:
        RootExpiredError: the root (or every bundle key in it) has expired.
        HeldBackError: no fresh heartbeat while the root requires one.
    """
    policy = root.bundle_policy(now, slack_s)
    if not require_fresh:
        return policy
    if problem := freshness_problem(root, beat, now=now, slack_s=slack_s):
        raise HeldBackError(problem)
    fresh = _fresh(beat, now, slack_s)
    if fresh is None:
        return policy
    floors = dict(policy.floors)
    why = f"the latest release the heartbeat of {format_time(fresh.issued)} names"
    for name, seq in fresh.latest.items():
        if seq > floors.get(name, (0, ""))[0]:
            floors[name] = (seq, why)
    return replace(policy, floors=floors)


def check_desired(
    root: TrustRoot,
    beat: Heartbeat | None,
    *,
    name: str,
    sequence: int,
    now: datetime,
    slack_s: float,
) -> None:
    """Should a device fetch the desired bundle (``name``, ``sequence``, as the untrusted
    desired state says)? Pure. The verified bundle is held to :func:`install_policy`.

    Raises:
        RootExpiredError: the root has expired: nothing new is installed.
        HeldBackError: no fresh heartbeat, or the heartbeat names a later release of
            ``name``: the desired state is stale.
        RollbackError: ``sequence`` is below the root's signed floor for ``name``.
    """
    policy = install_policy(root, beat, now=now, slack_s=slack_s, require_fresh=True)
    floor, why = policy.floors.get(name, (0, ""))
    if sequence >= floor:
        return
    if why.startswith("the latest release"):
        raise HeldBackError(
            f"the desired state names {name!r} sequence {sequence}, but {why} sequence"
            f" {floor}: the desired state is stale, this device is being held back"
        )
    raise RollbackError(
        f"the desired bundle's sequence {sequence} is below {floor}, {why} for {name!r}"
    )


def vouch_problem(
    root: TrustRoot, envelope_bytes: bytes, manifest: Manifest, *, now: datetime, slack_s: float
) -> str | None:
    """Why ``root`` no longer vouches for an installed version, or None if it does. Pure.

    It vouches while a threshold of its unexpired bundle keys, in scope for the model's
    name, signed the version's manifest, and its sequence is not below the signed floor.
    The root's own expiry is not a reason: an expired root stops installs, not serving.
    """
    try:
        policy = replace(
            root.role_policy(root.bundles, now=now, slack_s=slack_s), scopes=root.scopes
        )
        signers = check_signatures(Envelope.from_bytes(envelope_bytes), policy, PAYLOAD_TYPE)
        policy.check_scope(manifest.name, signers)
    except (BundleError, RootExpiredError) as exc:  # expired: every bundle key has
        return f"{root.label} no longer vouches for it: {exc}"
    floor = root.min_sequence.get(manifest.name, 0)
    if manifest.sequence < floor:
        return (
            f"its sequence {manifest.sequence} is below {floor}, the floor signed in"
            f" {root.label} for {manifest.name!r}"
        )
    return None
