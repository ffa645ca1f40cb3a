"""Signing keys: generate, store encrypted, load, sign DSSE envelopes.

Private keys are PKCS#8 PEM encrypted with a passphrase and written with mode 0600; the
public key (SubjectPublicKeyInfo PEM) sits beside them as ``<name>.pub``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.bundle.signing import Envelope, PublicKey, Signature, pae
from agent.errors import KeyFileError
from agent.plumbing.files import write_new

__all__ = ["SigningKey", "generate_key", "load_signing_key", "sign_envelope"]

KeyType = Literal["ed25519", "ecdsa-p256"]
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SigningKey:
    private: PrivateKey

    @property
    def public(self) -> PublicKey:
        return PublicKey.from_key(self.private.public_key())

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            return self.private.sign(message)
        return self.private.sign(message, ec.ECDSA(hashes.SHA256()))


def generate_key(path: Path, passphrase: bytes, keytype: KeyType = "ed25519") -> SigningKey:
    """Create a key pair: ``path`` (encrypted private key, 0600) and ``path.pub``.

    Raises:
        KeyFileError: the passphrase is empty or a file already exists there.
    """
    if not passphrase:
        raise KeyFileError("refusing to write an unencrypted private key: give a passphrase")
    private: PrivateKey = (
        ed25519.Ed25519PrivateKey.generate()
        if keytype == "ed25519"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    key = SigningKey(private)
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p} already exists; move it away or choose another name")
    for p, data, mode in ((path, pem, 0o600), (pub_path, key.public.to_pem(), 0o644)):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            write_new(p, data, mode=mode)
        except FileExistsError:
            raise KeyFileError(f"{p} already exists; move it away or choose another name") from None
        except OSError as exc:
            raise KeyFileError(f"cannot create {p}: {exc.strerror}") from None
    return key


def load_signing_key(path: Path, passphrase: bytes | None) -> SigningKey:
    """Load an encrypted private key.

    Raises:
        KeyFileError: the file is missing, the passphrase is wrong, or the key type is not
            Ed25519 or ECDSA P-256.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        private = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"cannot load signing key {path}: wrong passphrase or not a PEM private key ({exc})"
        ) from None
    if isinstance(private, ed25519.Ed25519PrivateKey) or (
        isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
    ):
        return SigningKey(private)
    raise KeyFileError(f"{path}: only Ed25519 and ECDSA P-256 keys are supported")


def sign_envelope(payload_type: str, payload: bytes, keys: list[SigningKey]) -> Envelope:
    """A DSSE envelope over ``payload`` with one signature per key."""
    message = pae(payload_type, payload)
    return Envelope(
        payload_type=payload_type,
        payload=payload,
        signatures=tuple(Signature(keyid=k.keyid, sig=k.sign(message)) for k in keys),
    )
