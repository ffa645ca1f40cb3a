"""The trust root: one signed, versioned document that says who may sign what.

Normative description: docs/bundle-format.md, section 7. A root names its keys and four
things about them: which keys sign the next root (``roles.root``: keys and threshold),
which sign bundles (``roles.bundles``, optionally scoped to model names), which online
key signs the short-lived heartbeat (``roles.freshness``, optional), and per model name
the lowest sequence any device may install (``min_sequence``: a floor that lives in the
signed root, not only in a device's state). It expires; a key may expire before it.

The document travels as the payload of a DSSE envelope (payload type
:data:`ROOT_PAYLOAD_TYPE`) like a bundle's manifest, with the same keys and key ids
(:mod:`agent.bundle.signing`). A bare trust policy (the TOML file devices held before
roots existed) is the root of version 0: its keys are its root and bundle keys.

This module is the document (parsing, canonical bytes, the bundle policy it implies);
:mod:`agent.bundle.trust` holds the rules for accepting a new one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, cast

from agent.bundle.manifest import NAME_RE, format_time
from agent.bundle.signing import Envelope, PublicKey, TrustPolicy, read_envelope
from agent.errors import ConfigError, RootError, RootExpiredError
from agent.plumbing.strict import Doc, load_json

__all__ = [
    "MAX_ROOT_BYTES",
    "ROOT_PAYLOAD_TYPE",
    "ROOT_SCHEMA_VERSION",
    "UNVOUCHED",
    "Freshness",
    "Role",
    "RootKey",
    "TrustRoot",
    "Unvouched",
    "claimed_version",
    "load_trust",
    "parse_sequences",
    "parse_time",
    "peek_version",
    "read_root",
    "root_envelope",
]

ROOT_PAYLOAD_TYPE = "application/vnd.edgeship.root+json"
ROOT_SCHEMA_VERSION = "1.0"
MAX_ROOT_BYTES = 256 * 1024  # the envelope, checked before parsing: 64 keys fit in 40 KiB
MAX_KEYS = 64
MAX_NAMES = 1024  # min_sequence entries
MAX_VALIDITY_S = 30 * 24 * 3600  # the longest heartbeat a root may allow
Unvouched = Literal["keep-serving", "roll-back"]
UNVOUCHED: tuple[Unvouched, ...] = ("keep-serving", "roll-back")

_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_KEYID_RE = re.compile(r"[0-9a-f]{64}")
_FLEET_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
# A scope entry: a model name, or a prefix ending in "*" ("kws-*"; "*" alone: any name).
_SCOPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\*?|\*")


def parse_time(doc: Doc, key: str) -> datetime:
    """A ``YYYY-MM-DDTHH:MM:SSZ`` field as an aware UTC time.

    Raises:
        doc.error: not that form, or no such date.
    """
    text = doc.text(key, max_len=20, pattern=_TIME_RE, what="a UTC time like 2026-01-31T12:00:00Z")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise doc.bad(key, "a valid date and time") from None


def _opt_time(t: datetime | None) -> str | None:
    return None if t is None else format_time(t)


@dataclass(frozen=True)
class RootKey:
    """A key the root lists; past ``expires`` (plus the clock slack) it signs no bundle and
    no heartbeat. Root signatures ignore key expiry: the root's own expiry bounds them."""

    key: PublicKey
    name: str | None = None
    expires: datetime | None = None

    def expired(self, now: datetime, slack_s: float) -> bool:
        return self.expires is not None and now - timedelta(seconds=slack_s) > self.expires


@dataclass(frozen=True)
class Role:
    """Keys (ids, sorted) and how many of them must sign."""

    keyids: tuple[str, ...]
    threshold: int


@dataclass(frozen=True)
class Freshness(Role):
    """The online role: signs heartbeats, valid at most ``max_validity_s`` each."""

    max_validity_s: int = 3600


@dataclass(frozen=True)
class TrustRoot:
    """A trust root, as parsed; :mod:`agent.bundle.trust` decides whether to believe one.

    ``envelope`` is the signed document as received (what a device persists and serves
    on); empty for the root of version 0 that a bare trust policy stands for.
    """

    version: int
    expires: datetime | None
    keys: Mapping[str, RootKey]
    root: Role
    bundles: Role
    scopes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    freshness: Freshness | None = None
    min_sequence: Mapping[str, int] = field(default_factory=dict)
    unvouched: Unvouched = "keep-serving"
    fleet: str | None = None
    envelope: bytes = field(default=b"", compare=False)

    @property
    def label(self) -> str:
        """How messages name it: ``trust root v3``, or the trust policy for version 0."""
        return "the trust policy" if self.version == 0 else f"trust root v{self.version}"

    @classmethod
    def from_policy(cls, policy: TrustPolicy) -> TrustRoot:
        """The root of version 0 a bare trust policy stands for: its keys sign the first
        root (so a fleet moves to roots over the air) and bundles; it never expires."""
        role = Role(tuple(sorted(policy.keys)), policy.threshold)
        keys = {k: RootKey(key) for k, key in policy.keys.items()}
        return cls(version=0, expires=None, keys=keys, root=role, bundles=role)

    def expired(self, now: datetime, slack_s: float) -> bool:
        return self.expires is not None and now - timedelta(seconds=slack_s) > self.expires

    def role_policy(
        self, role: Role, *, now: datetime | None = None, slack_s: float = 0.0
    ) -> TrustPolicy:
        """The keys of ``role`` as a policy; with ``now``, expired keys do not count (and
        are named in the error a document signed by them gets).

        Raises:
            RootExpiredError: fewer unexpired keys than the role's threshold.
        """
        active = [k for k in role.keyids if now is None or not self.keys[k].expired(now, slack_s)]
        retired = {
            k: f"expired at {_opt_time(self.keys[k].expires)}"
            for k in role.keyids
            if k not in active
        }
        if len(active) < role.threshold:
            raise RootExpiredError(
                f"only {len(active)} key(s) of a role in {self.label} are unexpired and it needs"
                f" {role.threshold}: sign a new root with fresh keys (edgeship trust rotate)"
            )
        return TrustPolicy(
            keys={k: self.keys[k].key for k in active},
            threshold=role.threshold,
            retired=retired,
            source=self.label,
        )

    def bundle_policy(self, now: datetime, slack_s: float) -> TrustPolicy:
        """What a bundle must satisfy now: unexpired bundle keys, scopes, signed floors.

        Raises:
            RootExpiredError: this root has expired, or too few of its bundle keys have not.
        """
        if self.expired(now, slack_s):
            raise RootExpiredError(
                f"{self.label} expired at {_opt_time(self.expires)}: nothing new is installed"
                " (what runs keeps serving) until a newer root arrives; sign one with"
                " `edgeship trust rotate` and publish it"
            )
        base = self.role_policy(self.bundles, now=now, slack_s=slack_s)
        why = f"the floor signed in {self.label}"
        return TrustPolicy(
            keys=base.keys,
            threshold=base.threshold,
            scopes={k: v for k, v in self.scopes.items() if k in base.keys},
            floors={name: (seq, why) for name, seq in self.min_sequence.items()},
            retired=base.retired,
            source=self.label,
        )

    # --- the document ----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The signed document as a JSON object (docs/bundle-format.md, section 7)."""

        def role(r: Role) -> dict[str, Any]:
            return {"keyids": list(r.keyids), "threshold": r.threshold}

        bundles = {**role(self.bundles), "scopes": {k: list(v) for k, v in self.scopes.items()}}
        freshness = None
        if self.freshness is not None:
            freshness = {**role(self.freshness), "max_validity_s": self.freshness.max_validity_s}
        return {
            "schema_version": ROOT_SCHEMA_VERSION,
            "version": self.version,
            "expires": _opt_time(self.expires),
            "fleet": self.fleet,
            "keys": {
                keyid: {
                    "keytype": k.key.keytype,
                    "public_key": k.key.to_pem().decode("ascii").strip(),
                    "name": k.name,
                    "expires": _opt_time(k.expires),
                }
                for keyid, k in self.keys.items()
            },
            "roles": {"root": role(self.root), "bundles": bundles, "freshness": freshness},
            "min_sequence": dict(self.min_sequence),
            "unvouched": self.unvouched,
        }

    def to_payload(self) -> bytes:
        """Canonical JSON (sorted keys, compact): what the root keys sign."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_payload(cls, data: bytes, envelope: bytes = b"") -> TrustRoot:
        """Parse a root document strictly (every rule of section 7 but the signatures).

        Raises:
            RootError: anything malformed; the message names the field.
        """
        d = Doc(load_json(data, what="trust root", error=RootError), "root", error=RootError)
        _present(d, "version", "expires", "fleet", "keys", "roles", "min_sequence", "unvouched")
        _present(d.obj("roles"), "root", "bundles", "freshness")
        if d.text("schema_version", max_len=16) != ROOT_SCHEMA_VERSION:
            raise d.bad(
                "schema_version", f'"{ROOT_SCHEMA_VERSION}" (upgrade the agent for newer roots)'
            )
        fleet = d.opt(d.text, "fleet", max_len=128, pattern=_FLEET_RE, what="a fleet id")
        keys = _parse_keys(d.obj("keys"))
        roles = d.obj("roles")
        root, _ = _parse_role(roles.obj("root"), keys)
        bundles, scopes = _parse_role(roles.obj("bundles"), keys, scoped=True)
        freshness = None
        if roles.has("freshness"):
            freshness = _parse_freshness(roles.obj("freshness"), keys, root, bundles)
        else:
            roles.raw("freshness", None)
        roles.done()
        used = set(root.keyids) | set(bundles.keyids) | set(freshness.keyids if freshness else ())
        if unused := sorted(set(keys) - used):
            raise RootError(f"root.keys lists key(s) in no role: {', '.join(unused)}")
        root_doc = cls(
            version=d.integer("version", minimum=1, maximum=2**53),
            expires=parse_time(d, "expires"),
            keys=keys,
            root=root,
            bundles=bundles,
            scopes=scopes,
            freshness=freshness,
            min_sequence=parse_sequences(d, "min_sequence"),
            unvouched=cast(Unvouched, d.choice("unvouched", UNVOUCHED)),
            fleet=fleet,
            envelope=envelope,
        )
        d.done()
        return root_doc


def _present(d: Doc, *keys: str) -> None:
    """Every field is written, null where it is optional: a missing one is a mistake.

    Raises:
        RootError: naming the first missing field.
    """
    for key in keys:
        if key not in d.value:
            raise RootError(f"{d.path(key)} is required (null where it does not apply)")


def _parse_keys(d: Doc) -> dict[str, RootKey]:
    if not d.value or len(d.value) > MAX_KEYS:
        raise RootError(f"root.keys must list 1 to {MAX_KEYS} keys")
    keys: dict[str, RootKey] = {}
    for keyid in d.value:
        if not _KEYID_RE.fullmatch(keyid):
            raise RootError(f"root.keys: {keyid[:80]!r} is not a key id (64 lowercase hex digits)")
        e = d.obj(keyid)
        _present(e, "name", "expires")
        pem = e.text("public_key", max_len=1024).encode("ascii", "replace")
        try:
            key = PublicKey.from_pem(pem)
        except ConfigError as exc:  # KeyFileError
            raise RootError(f"{e.path('public_key')}: {exc}") from None
        if key.keyid != keyid:
            raise RootError(f"root.keys.{keyid} holds another key (its id is {key.keyid})")
        if e.text("keytype", max_len=16) != key.keytype:
            raise e.bad("keytype", f"{key.keytype!r}, the type of its public key")
        name = e.opt(e.text, "name", max_len=128)
        expires = parse_time(e, "expires") if e.has("expires") else e.raw("expires", None)
        e.done()
        keys[keyid] = RootKey(key, name, expires)
    d.done()
    return keys


def _parse_role(
    d: Doc, keys: Mapping[str, RootKey], *, scoped: bool = False
) -> tuple[Role, dict[str, tuple[str, ...]]]:
    keyids = d.texts("keyids", max_len=MAX_KEYS)
    if not keyids or len(set(keyids)) != len(keyids):
        raise d.bad("keyids", "a non-empty list of distinct key ids")
    if missing := [k for k in keyids if k not in keys]:
        raise d.bad("keyids", f"ids of keys in root.keys ({missing[0][:16]}... is not)")
    role = Role(tuple(sorted(keyids)), d.integer("threshold", minimum=1, maximum=len(keyids)))
    scopes: dict[str, tuple[str, ...]] = {}
    if scoped:
        _present(d, "scopes")
        s = d.obj("scopes")
        for keyid in s.value:
            if keyid not in keyids:
                raise RootError(f"{s.path(keyid)[:120]}: only bundle keys have scopes")
            names = s.texts(keyid, max_len=MAX_NAMES)
            if not names or not all(_SCOPE_RE.fullmatch(n) for n in names):
                raise s.bad(keyid, "a non-empty list of model names or prefixes ending in *")
            scopes[keyid] = tuple(names)
        s.done()
    d.done()
    return role, scopes


def _parse_freshness(d: Doc, keys: Mapping[str, RootKey], root: Role, bundles: Role) -> Freshness:
    validity = d.integer("max_validity_s", minimum=1, maximum=MAX_VALIDITY_S)
    role, _ = _parse_role(d, keys)
    # The online key must have no other power: alone it can neither install nor rotate.
    if shared := set(role.keyids) & (set(root.keyids) | set(bundles.keyids)):
        raise RootError(
            f"root.roles.freshness shares key {sorted(shared)[0][:16]}... with another role;"
            " the online freshness key must sign nothing but heartbeats"
        )
    return Freshness(role.keyids, role.threshold, validity)


def parse_sequences(d: Doc, key: str) -> dict[str, int]:
    """A map of model names to sequences (a root's floors, a heartbeat's latest).

    Raises:
        d.error: not an object of at most 1,024 model names to integers >= 0.
    """
    value = d.any_obj(key)
    if len(value) > MAX_NAMES:
        raise d.bad(key, f"an object of at most {MAX_NAMES} model names")
    for name, seq in value.items():
        if not NAME_RE.fullmatch(name):
            raise d.error(f"{d.path(key)}: {name[:80]!r} is not a model name")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 2**63 - 1:
            raise d.error(f"{d.path(key)}.{name} must be an integer >= 0")
    return dict(value)


def read_root(data: bytes, *, unsigned: bool = False) -> tuple[Envelope, TrustRoot]:
    """A root envelope and its document, parsed strictly and NOT verified.

    For routing (which version is this?) and display; :func:`agent.bundle.trust.verify_root`
    decides whether to believe it. ``unsigned`` admits a draft nobody signed yet.

    Raises:
        RootError: over :data:`MAX_ROOT_BYTES`, not a canonical DSSE envelope of a root,
            or a malformed document.
    """
    envelope = root_envelope(data, unsigned=unsigned)
    return envelope, TrustRoot.from_payload(envelope.payload, data)


def root_envelope(data: bytes, *, unsigned: bool = False) -> Envelope:
    """The canonical DSSE envelope of a root, at most :data:`MAX_ROOT_BYTES`; NOT verified.

    Raises:
        RootError: too large, malformed, of another payload type, or not canonical.
    """
    return read_envelope(
        data,
        what="trust root",
        payload_type=ROOT_PAYLOAD_TYPE,
        max_bytes=MAX_ROOT_BYTES,
        error=RootError,
        unsigned=unsigned,
    )


def claimed_version(envelope: Envelope) -> int:
    """The version a root envelope's payload claims, read before anything is verified.

    Only this one field is read (strict JSON, an integer): enough to tell a replay from a
    gap in the chain. The document itself is parsed once the current root's keys have
    signed it.

    Raises:
        RootError: the payload is not JSON or has no valid version.
    """
    doc = Doc(
        load_json(envelope.payload, what="trust root", error=RootError), "root", error=RootError
    )
    return doc.integer("version", minimum=1, maximum=2**53)


def peek_version(data: bytes) -> int | None:
    """The version a root file claims (unverified; None if it has none): for reports."""
    try:
        return claimed_version(root_envelope(data))
    except RootError:
        return None


def load_trust(path: Path) -> TrustRoot:
    """A device's bootstrap trust: a signed root (JSON) or a bare trust policy (TOML).

    The file is the trust anchor the device was given; like the policy before it, it is
    believed as it is (its signatures are not checked here: that would load the signature
    library in every idle agent; ``edgeship-agent run --check`` and ``edgeship trust show``
    check them).

    Raises:
        ConfigError: unreadable, or neither a valid root nor a valid policy.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trust policy {path}: {exc.strerror}") from None
    if not data.lstrip().startswith(b"{"):
        return TrustRoot.from_policy(TrustPolicy.from_toml(data))
    try:
        return read_root(data)[1]
    except RootError as exc:
        raise ConfigError(f"trust file {path} is not a valid trust root: {exc}") from None
