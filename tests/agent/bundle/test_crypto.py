"""Payload encryption primitives and the manifest's ``encryption`` section (pure)."""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.bundle._manifest_read import is_usable_x25519
from agent.bundle.crypto import (
    DeviceKey,
    decrypt_file,
    encrypt_files,
    key_id,
    load_public_key,
    open_data_key,
)
from agent.bundle.manifest import ENCRYPTION_SCHEME, Manifest
from agent.errors import (
    DecryptionError,
    KeyFileError,
    MalformedManifestError,
    NotForThisDeviceError,
)
from tests.support.bundles import make_manifest

FILES = {"model/model.onnx": os.urandom(5000), "health/golden_inputs.npz": b"golden"}


def test_each_recipient_opens_the_files_and_nobody_else_does() -> None:
    a, b, stranger = DeviceKey.generate(), DeviceKey.generate(), DeviceKey.generate()
    enc, sealed = encrypt_files(FILES, [a.public, b.public])
    assert [r.key_id for r in enc.recipients] == [a.key_id, b.key_id]
    for device in (a, b):
        data_key = open_data_key(enc, device)
        for path, plain in FILES.items():
            assert sealed[path] != plain
            assert decrypt_file(enc, data_key, path, sealed[path]) == plain
    with pytest.raises(NotForThisDeviceError, match="not for this device"):
        open_data_key(enc, stranger)
    with pytest.raises(NotForThisDeviceError, match="no device key"):
        open_data_key(enc, None)


def test_a_file_moved_to_another_path_or_changed_does_not_decrypt() -> None:
    device = DeviceKey.generate()
    enc, sealed = encrypt_files(FILES, [device.public])
    data_key = open_data_key(enc, device)
    # Same nonce, other path in the associated data: refused.
    swapped = replace(
        enc, nonces={**enc.nonces, "health/golden_inputs.npz": enc.nonces["model/model.onnx"]}
    )
    with pytest.raises(DecryptionError):
        decrypt_file(swapped, data_key, "health/golden_inputs.npz", sealed["model/model.onnx"])
    flipped = bytearray(sealed["model/model.onnx"])
    flipped[10] ^= 1
    with pytest.raises(DecryptionError, match="does not decrypt"):
        decrypt_file(enc, data_key, "model/model.onnx", bytes(flipped))


def test_a_damaged_wrapped_key_is_a_decryption_error() -> None:
    device = DeviceKey.generate()
    enc, _ = encrypt_files(FILES, [device.public])
    r = enc.recipients[0]
    bad = replace(r, wrapped_key=bytes([r.wrapped_key[0] ^ 1]) + r.wrapped_key[1:])
    with pytest.raises(DecryptionError, match="does not open"):
        open_data_key(replace(enc, recipients=(bad,)), device)


def test_fresh_keys_and_nonces_every_time() -> None:
    device = DeviceKey.generate()
    one, sealed_one = encrypt_files(FILES, [device.public])
    two, sealed_two = encrypt_files(FILES, [device.public])
    assert one.recipients[0].ephemeral_public != two.recipients[0].ephemeral_public
    assert set(one.nonces.values()).isdisjoint(two.nonces.values())
    assert sealed_one != sealed_two


def test_device_key_files(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    key.save(tmp_path / "device.key")
    assert stat.S_IMODE((tmp_path / "device.key").stat().st_mode) == 0o600
    assert DeviceKey.load(tmp_path / "device.key").key_id == key.key_id
    assert key_id(load_public_key(tmp_path / "device.key.pub")) == key.key_id
    with pytest.raises(FileExistsError):
        key.save(tmp_path / "device.key")
    (tmp_path / "device.key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        DeviceKey.load(tmp_path / "device.key")
    with pytest.raises(KeyFileError, match="cannot read"):
        DeviceKey.load(tmp_path / "missing.key")
    signing = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "signing.pub").write_bytes(
        signing.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="not an X25519 public key"):
        load_public_key(tmp_path / "signing.pub")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_public_key(tmp_path / "device.key")  # a private key is not a public key


# --- the manifest section ----------------------------------------------------------------


def _encrypted_manifest() -> dict[str, object]:
    m = make_manifest()
    enc, _ = encrypt_files({f.path: b"x" for f in m.files}, [DeviceKey.generate().public])
    return replace(m, encryption=enc).to_json()


def test_encryption_section_round_trips() -> None:
    doc = _encrypted_manifest()
    m = Manifest.from_json(doc)
    assert m.encryption is not None
    assert m.encryption.scheme == ENCRYPTION_SCHEME
    assert Manifest.from_bytes(m.to_bytes()) == m
    assert "encryption" not in make_manifest().to_json()  # plain manifests are unchanged


def _mutate(doc: dict[str, object], change: str) -> dict[str, object]:
    doc = json.loads(json.dumps(doc))
    enc = doc["encryption"]
    assert isinstance(enc, dict)
    first = next(iter(enc["nonces"]))
    if change == "scheme":
        enc["scheme"] = "rot13"
    elif change == "no recipients":
        enc["recipients"] = []
    elif change == "twice":
        enc["recipients"] = enc["recipients"] * 2
    elif change == "short key":
        enc["recipients"][0]["wrapped_key"] = "AAAA"
    elif change == "bad base64":
        enc["recipients"][0]["ephemeral_public"] = "not base64!"
    elif change == "missing nonce":
        del enc["nonces"][first]
    elif change == "extra nonce":
        enc["nonces"]["other/file.bin"] = "AAAAAAAAAAAAAAAA"
    elif change == "reused nonce":
        for path in enc["nonces"]:
            enc["nonces"][path] = enc["nonces"][first]
    elif change == "unknown field":
        enc["compression"] = "zstd"
    elif change == "bad key id":
        enc["recipients"][0]["key_id"] = "XYZ"
    return doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("scheme", "is unknown"),
        ("no recipients", "at least one device key"),
        ("twice", "key id twice"),
        ("short key", "48 bytes"),
        ("bad base64", "32 bytes in canonical base64"),
        ("missing nonce", "exactly the files listed"),
        ("extra nonce", "exactly the files listed"),
        ("reused nonce", "nonce twice"),
        ("unknown field", "unknown key"),
        ("bad key id", "64 lowercase hex"),
    ],
)
def test_a_malformed_encryption_section_is_refused(change: str, message: str) -> None:
    with pytest.raises(MalformedManifestError, match=message):
        Manifest.from_json(_mutate(_encrypted_manifest(), change))


# --- key material in a signed manifest is a key before it is used --------------------------

_P = 2**255 - 19
_UNUSABLE = {
    "zero": 0,
    "one": 1,
    "order 8": int.from_bytes(
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"), "little"
    ),
    "order 8, other": int.from_bytes(
        bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"), "little"
    ),
    "p - 1": _P - 1,
    "p (non-canonical 0)": _P,
    "p + 1 (non-canonical 1)": _P + 1,
    "top bit set": 2**255 + 9,
}


def _with_ephemeral(raw: bytes) -> dict[str, object]:
    doc: dict[str, Any] = json.loads(json.dumps(_encrypted_manifest()))
    enc = doc["encryption"]
    enc["recipients"][0]["ephemeral_public"] = base64.b64encode(raw).decode()
    return doc


@pytest.mark.parametrize("u", _UNUSABLE.values(), ids=_UNUSABLE.keys())
def test_an_unusable_x25519_ephemeral_key_is_refused_when_the_manifest_is_read(u: int) -> None:
    raw = u.to_bytes(32, "little")
    # Each of these is what OpenSSL would refuse only later, mid-install, with a bare
    # ValueError (or, for a non-canonical spelling, silently reduce).
    with pytest.raises(MalformedManifestError, match="not a usable X25519 public key"):
        Manifest.from_json(_with_ephemeral(raw))


def test_the_x25519_check_agrees_with_openssl_on_random_keys() -> None:
    device = DeviceKey.generate()
    for _ in range(500):
        raw = bytearray(os.urandom(32))
        raw[31] &= 0x7F  # canonical spelling; the check itself is the question
        try:
            device.private.exchange(X25519PublicKey.from_public_bytes(bytes(raw)))
            usable = True
        except ValueError:
            usable = False
        assert is_usable_x25519(bytes(raw)) == usable
    assert all(is_usable_x25519(DeviceKey.generate().public.public_bytes_raw()) for _ in range(50))


def test_a_low_order_key_that_reaches_decryption_is_a_decryption_error() -> None:
    device = DeviceKey.generate()
    enc, _ = encrypt_files(FILES, [device.public])
    bad = replace(enc.recipients[0], ephemeral_public=bytes(32))
    with pytest.raises(DecryptionError):
        open_data_key(replace(enc, recipients=(bad,)), device)
