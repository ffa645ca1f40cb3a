"""Encrypted payloads: AES-256-GCM files, the data key wrapped for X25519 device keys.

A bundle built with ``edgeship build --encrypt-for DEVICE.pub`` carries every payload file
(model, golden inputs, expected outputs) as AES-256-GCM ciphertext under one random data
key, and the manifest's ``encryption`` section wraps that key for each recipient device
key. The signature and the file digests cover the ciphertext, so anyone can verify a
bundle; only a listed device can read it. The agent decrypts in memory when it loads:
the plaintext model never touches the device's disk.

Wrapping, per recipient (scheme ``x25519-hkdf-sha256+aes-256-gcm``):

    shared = X25519(ephemeral_private, device_public)
    kek    = HKDF-SHA256(shared, salt=none, info="edgeship/v1/wrap" || ephemeral_public
                         || device_public, 32 bytes)
    wrapped_key = AES-256-GCM(kek, nonce=12 zero bytes, data_key, aad="edgeship/v1/key")

(a fresh ephemeral key per recipient, so each kek seals exactly one message). Each file:
``AES-256-GCM(data_key, nonce from the manifest, plaintext, aad="edgeship/v1/file:" ||
path)``; the path in the associated data stops files being swapped for one another.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.bundle.manifest import Encryption, Recipient
from agent.errors import DecryptionError, KeyFileError, NotForThisDeviceError
from agent.plumbing.files import write_new

__all__ = [
    "DeviceKey",
    "decrypt_file",
    "encrypt_files",
    "key_id",
    "load_public_key",
    "open_data_key",
]

_WRAP_INFO = b"edgeship/v1/wrap"
_KEY_AAD = b"edgeship/v1/key"
_FILE_AAD = b"edgeship/v1/file:"
_ZERO_NONCE = bytes(12)
MAX_FILE_BYTES = 2**31 - 1  # cryptography's one-shot AES-GCM limit (pyca issue 6486)


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: X25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key, hex: how a manifest names a recipient."""
    return hashlib.sha256(_raw(public)).hexdigest()


def _kek(shared: bytes, ephemeral_public: bytes, device_public: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_WRAP_INFO + ephemeral_public + device_public,
    ).derive(shared)


@dataclass(frozen=True)
class DeviceKey:
    """A device's X25519 private key, which opens bundles encrypted for it."""

    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> DeviceKey:
        """Read a PEM (PKCS#8) X25519 private key.

        Raises:
            KeyFileError: missing, unreadable, readable by others, or not an X25519 key.
        """
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read the device key {path}: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"the device key {path} is readable by other users; chmod 600 it")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, X25519PrivateKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}, not an X25519 key")
        return cls(key)

    @property
    def public(self) -> X25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    def save(self, path: Path) -> None:
        """Write the private key (PEM, mode 0600, never over an existing file) and
        ``path.pub`` (the public key, to give to whoever builds bundles)."""
        pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_new(path, pem, mode=0o600)
        Path(f"{path}.pub").write_bytes(
            self.public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def load_public_key(path: Path) -> X25519PublicKey:
    """Read a device's public key (PEM SubjectPublicKeyInfo), as ``edgeship-agent keygen``
    writes it.

    Raises:
        KeyFileError: missing, unreadable or not an X25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the device public key {path}: {exc}") from None
    if not isinstance(key, X25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an X25519 public key")
    return key


def encrypt_files(
    plaintexts: dict[str, bytes], recipients: list[X25519PublicKey]
) -> tuple[Encryption, dict[str, bytes]]:
    """Encrypt payload files for ``recipients``. Returns the manifest section and the
    ciphertexts by path.

    Raises:
        ValueError: no recipients, or a file of 2 GiB or more.
    """
    if not recipients:
        raise ValueError("at least one recipient key is needed")
    for path, plain in plaintexts.items():
        if len(plain) > MAX_FILE_BYTES:
            raise ValueError(
                f"{path} is {len(plain)} bytes; AES-GCM files are limited to 2 GiB here"
            )
    data_key = AESGCM.generate_key(bit_length=256)
    wrapped = []
    for public in recipients:
        ephemeral = X25519PrivateKey.generate()
        eph_raw = _raw(ephemeral.public_key())
        kek = _kek(ephemeral.exchange(public), eph_raw, _raw(public))
        sealed = AESGCM(kek).encrypt(_ZERO_NONCE, data_key, _KEY_AAD)
        wrapped.append(Recipient(key_id(public), eph_raw, sealed))
    aead = AESGCM(data_key)
    nonces, out = {}, {}
    for path, plain in sorted(plaintexts.items()):
        nonce = os.urandom(12)
        nonces[path] = nonce
        out[path] = aead.encrypt(nonce, plain, _FILE_AAD + path.encode())
    return Encryption(recipients=tuple(wrapped), nonces=nonces), out


def open_data_key(encryption: Encryption, key: DeviceKey | None) -> bytes:
    """Unwrap the bundle's data key with this device's key.

    Raises:
        NotForThisDeviceError: no key configured, or the bundle is not encrypted for it.
        DecryptionError: the wrapped key does not open (a wrong or damaged key).
    """
    ids = ", ".join(r.key_id[:16] for r in encryption.recipients)
    if key is None:
        raise NotForThisDeviceError(
            f"the bundle is encrypted (for key ids {ids}) and this agent has no device key;"
            " configure decryption_key"
        )
    mine = key.key_id
    for r in encryption.recipients:
        if r.key_id == mine:
            device_raw = _raw(key.public)
            try:
                # The manifest reader refuses low-order keys; a ValueError here (OpenSSL's
                # all-zero shared secret) would mean a manifest made by other means.
                shared = key.private.exchange(X25519PublicKey.from_public_bytes(r.ephemeral_public))
                kek = _kek(shared, r.ephemeral_public, device_raw)
                return AESGCM(kek).decrypt(_ZERO_NONCE, r.wrapped_key, _KEY_AAD)
            except (InvalidTag, ValueError):
                raise DecryptionError(
                    f"the data key wrapped for this device ({mine[:16]}) does not open; the"
                    " bundle was built with a damaged key entry"
                ) from None
    raise NotForThisDeviceError(
        f"the bundle is encrypted for key ids {ids}, not for this device's key {mine[:16]}"
    )


def decrypt_file(encryption: Encryption, data_key: bytes, path: str, ciphertext: bytes) -> bytes:
    """Decrypt one payload file.

    Raises:
        DecryptionError: the file does not decrypt under this key and path.
    """
    nonce = encryption.nonces.get(path)
    if nonce is None:
        raise DecryptionError(f"the manifest has no nonce for {path}")
    try:
        return AESGCM(data_key).decrypt(nonce, ciphertext, _FILE_AAD + path.encode())
    except InvalidTag:
        raise DecryptionError(
            f"{path} does not decrypt with the bundle's data key; the bundle was built wrong"
        ) from None
