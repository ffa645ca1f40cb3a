"""Trust roots and heartbeats on the operator's side: draft, sign across machines, check.

The format and the rules are the device's (:mod:`agent.bundle.root`,
:mod:`agent.bundle.heartbeat`, :mod:`agent.bundle.trust`); this module writes what a
device will accept, and checks a file the way a device will before anyone publishes it.

Threshold signing with keys on separate machines: one person drafts the next root
(:func:`make_root` or :func:`change_root`, then :func:`draft`: an envelope without
signatures), each key holder adds a signature to a copy of the same file
(:func:`sign_root`) on their own machine, and the copies are merged (:func:`merge_roots`).
:func:`root_report` says which keys signed and whether both thresholds are met: a root
N+1 needs a threshold of root N's root keys and of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from agent.bundle.heartbeat import HEARTBEAT_PAYLOAD_TYPE, Heartbeat
from agent.bundle.root import (
    ROOT_PAYLOAD_TYPE,
    Freshness,
    Role,
    RootKey,
    TrustRoot,
    Unvouched,
    read_root,
)
from agent.bundle.signing import (
    MAX_SIGNATURES,
    Envelope,
    PublicKey,
    Signature,
    pae,
    valid_signers,
)
from agent.errors import ConfigError, RootError
from sdk.build.keys import SigningKey, sign_envelope

__all__ = [
    "RoleKeys",
    "RootChange",
    "change_root",
    "draft",
    "make_heartbeat",
    "make_root",
    "merge_roots",
    "root_report",
    "sign_root",
]


@dataclass(frozen=True)
class RoleKeys:
    """The keys of a new root, per role, with the names to show for them."""

    root: Sequence[PublicKey]
    bundles: Sequence[PublicKey]
    freshness: Sequence[PublicKey] = ()
    names: Mapping[str, str] = field(default_factory=dict)  # keyid -> name


def make_root(
    keys: RoleKeys,
    *,
    expires: datetime,
    root_threshold: int = 1,
    bundle_threshold: int = 1,
    freshness_threshold: int = 1,
    max_validity_s: int = 3600,
    scopes: Mapping[str, Sequence[str]] | None = None,
    key_expiry: Mapping[str, datetime] | None = None,
    min_sequence: Mapping[str, int] | None = None,
    unvouched: Unvouched = "keep-serving",
    fleet: str | None = None,
    version: int = 1,
) -> TrustRoot:
    """A first root (version 1), checked by the device's own parser.

    Raises:
        RootError: it breaks a rule of the format (the message names it).
    """
    everyone = {k.keyid: k for k in (*keys.root, *keys.bundles, *keys.freshness)}
    expiry = key_expiry or {}
    root = TrustRoot(
        version=version,
        expires=expires,
        keys={kid: RootKey(k, keys.names.get(kid), expiry.get(kid)) for kid, k in everyone.items()},
        root=_role(keys.root, root_threshold, "root"),
        bundles=_role(keys.bundles, bundle_threshold, "bundles"),
        scopes={k: tuple(v) for k, v in (scopes or {}).items()},
        freshness=None
        if not keys.freshness
        else Freshness(
            tuple(sorted({k.keyid for k in keys.freshness})), freshness_threshold, max_validity_s
        ),
        min_sequence=dict(min_sequence or {}),
        unvouched=unvouched,
        fleet=fleet,
    )
    return _checked(root)


def _role(keys: Sequence[PublicKey], threshold: int, name: str) -> Role:
    ids = tuple(sorted({k.keyid for k in keys}))
    if not ids:
        raise RootError(f"the {name} role needs at least one key")
    return Role(ids, threshold)


def _checked(root: TrustRoot) -> TrustRoot:
    """The root as a device reads it: every rule of the format applied."""
    return TrustRoot.from_payload(root.to_payload())


@dataclass(frozen=True)
class RootChange:
    """What the next root changes; everything left at its default stays as it was."""

    add_root: Sequence[PublicKey] = ()
    add_bundles: Sequence[PublicKey] = ()
    add_freshness: Sequence[PublicKey] = ()
    remove: Sequence[str] = ()  # key ids, out of every role: revocation
    names: Mapping[str, str] = field(default_factory=dict)
    root_threshold: int | None = None
    bundle_threshold: int | None = None
    freshness_threshold: int | None = None
    no_freshness: bool = False
    max_validity_s: int | None = None
    scopes: Mapping[str, Sequence[str]] = field(default_factory=dict)  # replaces per key
    key_expiry: Mapping[str, datetime] = field(default_factory=dict)
    min_sequence: Mapping[str, int] = field(default_factory=dict)  # raised or set per name
    unvouched: Unvouched | None = None
    fleet: str | None = None


def change_root(current: TrustRoot, change: RootChange, *, expires: datetime) -> TrustRoot:
    """Root version N+1: ``current`` with ``change`` applied.

    Raises:
        ConfigError: a key to remove is not in ``current``, or a role would keep fewer
            keys than its threshold (the message says what to do).
        RootError: the result breaks another rule of the format.
    """
    if change.no_freshness and change.add_freshness:
        raise ConfigError("a freshness key cannot be added to a root without a freshness role")
    unknown = [k for k in change.remove if k not in current.keys]
    if unknown:
        raise ConfigError(f"key {unknown[0][:16]}... is not in trust root v{current.version}")
    keys = {k: v for k, v in current.keys.items() if k not in change.remove}
    for k in (*change.add_root, *change.add_bundles, *change.add_freshness):
        keys.setdefault(k.keyid, RootKey(k))
    for kid, name in change.names.items():
        if kid in keys:
            keys[kid] = replace(keys[kid], name=name)
    for kid, when in change.key_expiry.items():
        if kid in keys:
            keys[kid] = replace(keys[kid], expires=when)

    def role(
        old: Role | None, added: Sequence[PublicKey], threshold: int | None, name: str
    ) -> Role:
        ids = {*(old.keyids if old else ()), *(k.keyid for k in added)} - set(change.remove)
        wanted = threshold if threshold is not None else (old.threshold if old else 1)
        if len(ids) < wanted:
            raise ConfigError(
                f"the {name} role would keep {len(ids)} key(s), fewer than its threshold"
                f" {wanted}: add keys to it or lower its threshold"
            )
        return Role(tuple(sorted(ids)), wanted)

    freshness = None
    if not change.no_freshness and (current.freshness or change.add_freshness):
        r = role(current.freshness, change.add_freshness, change.freshness_threshold, "freshness")
        validity = change.max_validity_s or (
            current.freshness.max_validity_s if current.freshness else 3600
        )
        freshness = Freshness(r.keyids, r.threshold, validity)
    kept_ids = set(keys) - (
        set(current.freshness.keyids) if change.no_freshness and current.freshness else set()
    )
    scopes = {k: v for k, v in current.scopes.items() if k in kept_ids}
    scopes.update({k: tuple(v) for k, v in change.scopes.items()})
    new = TrustRoot(
        version=current.version + 1,
        expires=expires,
        keys={k: v for k, v in keys.items() if k in kept_ids},
        root=role(current.root, change.add_root, change.root_threshold, "root"),
        bundles=role(current.bundles, change.add_bundles, change.bundle_threshold, "bundles"),
        scopes=scopes,
        freshness=freshness,
        min_sequence={**current.min_sequence, **change.min_sequence},
        unvouched=change.unvouched or current.unvouched,
        fleet=change.fleet if change.fleet is not None else current.fleet,
    )
    return _checked(new)


def draft(root: TrustRoot) -> bytes:
    """The root as an envelope without signatures: the file key holders sign."""
    return Envelope(ROOT_PAYLOAD_TYPE, root.to_payload(), ()).to_bytes()


def sign_root(data: bytes, keys: Iterable[SigningKey]) -> bytes:
    """``data`` (a root file, signed or not) with a signature of each key added.

    A key that already signed is not signed again.

    Raises:
        RootError: ``data`` is not a root file, or more than 16 signatures would result.
    """
    envelope, _ = read_root(data, unsigned=True)
    have = {s.keyid for s in envelope.signatures}
    message = pae(ROOT_PAYLOAD_TYPE, envelope.payload)
    added = [Signature(k.keyid, k.sign(message)) for k in keys if k.keyid not in have]
    return _with(envelope, (*envelope.signatures, *added))


def merge_roots(copies: Sequence[bytes]) -> bytes:
    """One root file holding the signatures of every copy (each key id once).

    Raises:
        RootError: a copy is not a root file, or the copies are of different roots.
    """
    if not copies:
        raise RootError("nothing to merge")
    envelopes = [read_root(c, unsigned=True)[0] for c in copies]
    if any(e.payload != envelopes[0].payload for e in envelopes):
        raise RootError("the files hold different roots: each key holder must sign the same one")
    signatures: dict[str, Signature] = {}
    for e in envelopes:
        for s in e.signatures:
            signatures.setdefault(s.keyid, s)
    return _with(envelopes[0], tuple(signatures.values()))


def _with(envelope: Envelope, signatures: tuple[Signature, ...]) -> bytes:
    if len(signatures) > MAX_SIGNATURES:
        raise RootError(f"a root carries at most {MAX_SIGNATURES} signatures")
    return replace(envelope, signatures=signatures).to_bytes()


def root_report(data: bytes, previous: TrustRoot | None) -> dict[str, Any]:
    """Who signed a root file, and whether a device holding ``previous`` would take it.

    ``previous`` None: a first root (a device's bootstrap), which needs only its own root
    keys. Missing or bad signatures are reported, not raised.

    Raises:
        RootError: ``data`` is not a root file.
    """
    envelope, root = read_root(data, unsigned=True)
    doc: dict[str, Any] = {"version": root.version, "signed_by": _signers(envelope)}
    ready = True
    for label, signer in [("own", root)] + ([] if previous is None else [("previous", previous)]):
        valid = valid_signers(envelope, signer.role_policy(signer.root))
        ready = ready and len(valid) >= signer.root.threshold
        doc[f"{label}_root_keys"] = {
            "version": signer.version,
            "signed": valid,
            "threshold": signer.root.threshold,
        }
    if previous is not None and root.version != previous.version + 1:
        ready = False
        doc["error"] = f"version {root.version} does not follow {previous.version}"
    doc["ready"] = ready
    return doc


def _signers(envelope: Envelope) -> list[str]:
    return list(dict.fromkeys(s.keyid for s in envelope.signatures))


def make_heartbeat(
    key: SigningKey,
    *,
    fleet: str,
    root_version: int,
    latest: Mapping[str, int],
    valid_for_s: int,
    now: datetime,
) -> bytes:
    """A heartbeat signed by the online key, issued ``now`` (whole seconds).

    Raises:
        HeartbeatError: the fields break a rule of the format.
    """
    issued = now.replace(microsecond=0)
    beat = Heartbeat(
        fleet=fleet,
        issued=issued,
        expires=issued + timedelta(seconds=valid_for_s),
        root_version=root_version,
        latest=dict(latest),
    )
    payload = Heartbeat.from_payload(beat.to_payload()).to_payload()  # the device's rules
    return sign_envelope(HEARTBEAT_PAYLOAD_TYPE, payload, [key]).to_bytes()
