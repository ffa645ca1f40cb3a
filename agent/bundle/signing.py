"""DSSE envelopes, public keys and the trust policy: who may sign a bundle.

Pure: bytes and a :class:`TrustPolicy` in, a verified payload or a typed error out.
Signing (which needs private keys) lives in the SDK; the device only verifies.

* Envelope: DSSE v1 (``{"payload", "payloadType", "signatures": [{"keyid", "sig"}]}``),
  signatures over ``PAE(payloadType, payload)``.
* Keys: Ed25519 (default) and ECDSA P-256 with SHA-256 (what secure elements and HSMs
  offer). A key id is the sha256 of the key's DER SubjectPublicKeyInfo, hex-encoded.
* Trust policy: trusted public keys and a threshold; each key id counts once. A policy
  made from a signed trust root (:mod:`agent.bundle.root`) also says which keys may sign
  which model names (scopes), the lowest sequence accepted per name (floors), and which
  keys it no longer trusts and why (for the error message only).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.errors import (
    BadSignatureError,
    ConfigError,
    KeyFileError,
    ThresholdError,
    UntrustedSignerError,
)
from agent.plumbing.strict import Doc, load_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # the backport, a dependency on these Pythons only
    import tomli as tomllib

__all__ = [
    "Envelope",
    "PublicKey",
    "Signature",
    "TrustPolicy",
    "check_signatures",
    "name_in_scope",
    "pae",
    "read_envelope",
    "valid_signers",
    "verify_envelope",
]

KeyType = Literal["ed25519", "ecdsa-p256"]
MAX_SIGNATURES = 16  # more than any sane policy; bounds work done on hostile envelopes

# The DER SubjectPublicKeyInfo of every Ed25519 key: this prefix and the 32 key bytes.
# Reading it needs no cryptography library, so an agent that only loads its trust policy
# (and verifies nothing until a bundle arrives) does not import one.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
# The same for an uncompressed P-256 point (0x04, X, Y): what secure elements export and
# what this module writes. Whether the point is on the curve is checked when it verifies
# (a key that is not never verifies anything).
_P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class PublicKey:
    """A verification key, identified by the sha256 of its SubjectPublicKeyInfo."""

    keytype: KeyType
    spki_der: bytes

    @property
    def keyid(self) -> str:
        return hashlib.sha256(self.spki_der).hexdigest()

    @classmethod
    def from_pem(cls, pem: bytes) -> PublicKey:
        """Load a PEM public key. Raises: KeyFileError if it is not Ed25519 or ECDSA P-256."""
        der = _pem_der(pem)
        if der is not None and len(der) == 44 and der.startswith(_ED25519_SPKI_PREFIX):
            return cls(keytype="ed25519", spki_der=der)  # already the canonical encoding
        if der is not None and len(der) == 91 and der.startswith(_P256_SPKI_PREFIX):
            return cls(keytype="ecdsa-p256", spki_der=der)
        from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 - lazy
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, UnsupportedAlgorithm) as exc:  # an unknown algorithm's OID
            raise KeyFileError(f"not a PEM public key: {exc}") from None
        return cls.from_key(key)

    @classmethod
    def from_key(cls, key: object) -> PublicKey:
        """Wrap a ``cryptography`` public key. Raises: KeyFileError for other key types."""
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - lazy
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: PLC0415

        keytype: KeyType
        if isinstance(key, ed25519.Ed25519PublicKey):
            keytype = "ed25519"
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            keytype = "ecdsa-p256"
        else:
            raise KeyFileError("only Ed25519 and ECDSA P-256 keys are supported")
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(keytype=keytype, spki_der=der)

    def to_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - lazy

        key = serialization.load_der_public_key(self.spki_der)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raises: InvalidSignature (from ``cryptography``) if the signature does not verify."""
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415 - lazy
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: PLC0415

        try:
            key = serialization.load_der_public_key(self.spki_der)
        except ValueError:  # a P-256 point off the curve, read without the library
            raise InvalidSignature from None
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:  # pragma: no cover - from_key admits only the two types above
            raise InvalidSignature


def _pem_der(pem: bytes) -> bytes | None:
    """The DER inside one ``PUBLIC KEY`` PEM block, or None for anything less plain."""
    text = pem.strip()
    if not (text.startswith(_PEM_BEGIN) and text.endswith(_PEM_END)):
        return None
    body = b"".join(text[len(_PEM_BEGIN) : -len(_PEM_END)].split())
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                for s in self.signatures
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        what: str = "manifest.sig",
        error: type[Exception] = BadSignatureError,
        unsigned: bool = False,
    ) -> Envelope:
        """Parse a DSSE envelope (``what`` names it in messages).

        ``unsigned`` admits an envelope without signatures: a trust root being drafted,
        before its key holders sign it. Nothing that verifies accepts one.

        Raises:
            error: it is malformed (``BadSignatureError`` unless the caller names another).
        """
        parsed = load_json(data, what=f"{what} (a DSSE envelope)", error=error)
        doc = Doc(parsed, what, error=error)
        # Its size was capped before parsing (Limits.max_signature_bytes, the root's cap).
        payload_type = doc.text("payloadType", max_len=256)
        payload = _b64(doc.text("payload", max_len=len(data)), error)
        sigs = doc.array("signatures", max_len=MAX_SIGNATURES)
        if not sigs and not unsigned:
            raise error(f"{what}: the DSSE envelope carries no signatures")
        signatures = []
        for s in doc.items("signatures", max_len=MAX_SIGNATURES):
            s.strict = False  # DSSE leaves room for more fields per signature
            signatures.append(
                Signature(
                    keyid=s.text("keyid", max_len=256),
                    sig=_b64(s.text("sig", max_len=1024), error),
                )
            )
        doc.done()
        return cls(payload_type=payload_type, payload=payload, signatures=tuple(signatures))


def read_envelope(
    data: bytes,
    *,
    what: str,
    payload_type: str,
    max_bytes: int,
    error: type[Exception],
    unsigned: bool = False,
) -> Envelope:
    """A signed document that travels alone (a trust root, a heartbeat): a DSSE envelope
    in canonical form, of ``payload_type``, at most ``max_bytes``. NOT verified.

    Raises:
        error: too large, malformed, of another type, or not canonical (altered).
    """
    if len(data) > max_bytes:
        raise error(f"a {what} is at most {max_bytes} bytes; this one has {len(data)}")
    envelope = Envelope.from_bytes(data, what=what, error=error, unsigned=unsigned)
    if envelope.payload_type != payload_type:
        raise error(f"payloadType is {envelope.payload_type!r}, not {payload_type!r}: no {what}")
    if envelope.to_bytes() != data:
        raise error(f"the {what}'s envelope is not in canonical form; it was altered")
    return envelope


def _policy_error(message: str) -> ConfigError:
    return ConfigError(f"trust policy: {message}")


def _b64(text: str, error: type[Exception] = BadSignatureError) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise error("DSSE envelope holds invalid base64") from None


@dataclass(frozen=True)
class TrustPolicy:
    """The keys a device trusts to sign bundles, and how many must agree.

    A policy made from a trust root (``TrustRoot.bundle_policy``) also carries the root's
    rules for bundles: ``scopes`` (key id -> the model names it may sign; a key not listed
    signs any), ``floors`` (model name -> the lowest sequence accepted and why), and
    ``retired`` (key id -> why it no longer counts, e.g. its expiry: named in the error
    a bundle signed by it gets). ``source`` names the policy in messages.
    """

    keys: Mapping[str, PublicKey]  # keyid -> key
    threshold: int = 1
    scopes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    floors: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    retired: Mapping[str, str] = field(default_factory=dict)
    source: str = "the trust policy"

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("trust policy lists no keys")
        if not 1 <= self.threshold <= len(self.keys):
            raise ConfigError(
                f"trust policy threshold {self.threshold} must be between 1 and the number of"
                f" keys ({len(self.keys)})"
            )

    def check_scope(self, name: str, signers: frozenset[str]) -> None:
        """Did at least ``threshold`` of the keys that signed (``signers``, verified) have
        ``name`` in their scope?

        Raises:
            ThresholdError: too few of them may sign this model name.
        """
        allowed = [k for k in signers if name_in_scope(name, self.scopes.get(k))]
        if len(allowed) < self.threshold:
            raise ThresholdError(
                f"{len(allowed)} of the {len(signers)} key(s) that signed may sign model"
                f" {name!r} under {self.source} (their scopes); it needs {self.threshold}:"
                " sign it with a key whose scope includes this name"
            )

    @classmethod
    def of(cls, keys: Sequence[PublicKey], threshold: int = 1) -> TrustPolicy:
        return cls(keys={k.keyid: k for k in keys}, threshold=threshold)

    @classmethod
    def from_toml(cls, data: bytes) -> TrustPolicy:
        """Parse a trust policy file.

        The file holds ``threshold = K`` and one ``[[keys]]`` table per key with
        ``public_key`` (PEM text), and optionally ``keyid`` (checked against the key),
        ``keytype`` (checked too) and ``name``. Nothing else.

        Raises:
            ConfigError: the file is not valid TOML or not a valid policy.
        """
        try:
            parsed = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"trust policy is not valid TOML: {exc}") from None
        doc = Doc(parsed, "", error=_policy_error)
        threshold = doc.integer("threshold", 1)
        if not doc.has("keys") or not doc.array("keys"):
            raise ConfigError("trust policy needs at least one [[keys]] entry")
        keys: dict[str, PublicKey] = {}
        for entry in doc.items("keys", max_len=256):
            key = PublicKey.from_pem(
                entry.text("public_key", max_len=16384).encode("ascii", "replace")
            )
            for name, actual in (("keyid", key.keyid), ("keytype", key.keytype)):
                claimed = entry.opt(entry.text, name, max_len=128)
                if claimed is not None and claimed != actual:
                    raise ConfigError(
                        f"trust policy {entry.path(name)} {claimed} does not match its public"
                        f" key ({actual})"
                    )
            entry.opt(entry.text, "name", max_len=256)
            entry.done()
            keys[key.keyid] = key
        doc.done()
        return cls(keys=keys, threshold=threshold)

    @classmethod
    def load(cls, path: Path) -> TrustPolicy:
        """Read a trust policy file (TOML, see :meth:`from_toml`).

        Raises:
            ConfigError: unreadable or invalid.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read trust policy {path}: {exc.strerror}") from None
        return cls.from_toml(data)

    def to_toml(self, names: Mapping[str, str] | None = None) -> bytes:
        lines = [f"threshold = {self.threshold}", ""]
        for keyid in sorted(self.keys):
            key = self.keys[keyid]
            lines.append("[[keys]]")
            if names and keyid in names:
                lines.append(f"name = {json.dumps(names[keyid])}")
            lines.append(f'keyid = "{keyid}"')
            lines.append(f'keytype = "{key.keytype}"')
            lines.append('public_key = """')
            lines.append(key.to_pem().decode("ascii").strip())
            lines.append('"""')
            lines.append("")
        return "\n".join(lines).encode("ascii")


def name_in_scope(name: str, scope: Sequence[str] | None) -> bool:
    """Is model ``name`` in ``scope`` (exact names, or ``prefix*``)? None: any name."""
    if scope is None:
        return True
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in scope)


def verify_envelope(envelope: Envelope, policy: TrustPolicy, payload_type: str) -> bytes:
    """Check an envelope against a trust policy and return the signed payload.

    Raises:
        as :func:`check_signatures`.
    """
    check_signatures(envelope, policy, payload_type)
    return envelope.payload


def check_signatures(
    envelope: Envelope, policy: TrustPolicy, payload_type: str, *, what: str = "bundle"
) -> frozenset[str]:
    """Check an envelope against a trust policy; return the key ids whose signature verified.

    Signatures from keys the policy does not list are ignored; each trusted key id counts
    once, however many signatures carry it. ``what`` names the document in messages.

    Raises:
        BadSignatureError: wrong payload type, or no trusted signature verifies while at
            least one claims a trusted key id.
        UntrustedSignerError: no signature claims a key the policy trusts (the message
            names a signer the policy retired, and why).
        ThresholdError: fewer distinct trusted keys signed than the threshold.
    """
    if envelope.payload_type != payload_type:
        raise BadSignatureError(
            f"envelope payloadType is {envelope.payload_type!r}, expected {payload_type!r}"
        )
    valid = valid_signers(envelope, policy)
    claimed_trusted = sum(1 for sig in envelope.signatures if sig.keyid in policy.keys)
    if len(valid) >= policy.threshold:
        return frozenset(valid)
    retired = [f"{k[:12]} {policy.retired[k]}" for k in _signers(envelope) if k in policy.retired]
    if claimed_trusted == 0:
        why = f" (signed by key {'; '.join(retired)})" if retired else ""
        raise UntrustedSignerError(
            f"no signature on this {what} comes from a key {policy.source} trusts{why}; sign"
            " it with a trusted key or add the signer's public key to the policy"
        )
    if not valid:
        raise BadSignatureError(
            f"the {what}'s signatures do not verify: it was altered after signing or signed"
            " with a different key than its key id claims"
        )
    why = f" (also signed by key {'; '.join(retired)})" if retired else ""
    raise ThresholdError(
        f"only {len(valid)} distinct trusted key(s) signed this {what}{why}; {policy.source}"
        f" needs {policy.threshold}"
    )


def valid_signers(envelope: Envelope, policy: TrustPolicy) -> list[str]:
    """The distinct key ids of ``policy`` whose signature on ``envelope`` verifies, in the
    envelope's order; each key is tried once (bounded work on a hostile envelope)."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - when verifying

    message = pae(envelope.payload_type, envelope.payload)
    valid: list[str] = []
    for sig in envelope.signatures:
        key = policy.keys.get(sig.keyid)
        if key is None or sig.keyid in valid:
            continue
        try:
            key.verify(sig.sig, message)
        except InvalidSignature:
            continue
        valid.append(sig.keyid)
    return valid


def _signers(envelope: Envelope) -> list[str]:
    """The key ids an envelope claims, each once, in order."""
    return list(dict.fromkeys(s.keyid for s in envelope.signatures))
