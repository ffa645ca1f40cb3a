"""OpenSSF Model Signing both ways, against the real ``model-signing`` package: as a library
and as its command line in a subprocess."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import model_signing  # a dev dependency: missing, these tests fail rather than skip
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.bundle.signing import PublicKey
from sdk.build.keys import generate_key
from sdk.build.oms import sign_model, verify_model_signature
from sdk.errors import BuildError, ModelSignatureError

PASSPHRASE = b"correct horse"
CLI = str(Path(sys.executable).parent / "model_signing")


@pytest.fixture
def signer(tmp_path: Path) -> tuple[Path, Path]:
    generate_key(tmp_path / "publisher", PASSPHRASE, "ecdsa-p256")
    return tmp_path / "publisher", tmp_path / "publisher.pub"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "net.onnx"
    path.parent.mkdir()
    path.write_bytes(bytes(range(256)) * 64)
    return path


def _library_sign(model: Path, key: Path, out: Path) -> None:
    model_signing.signing.Config().use_elliptic_key_signer(
        private_key=key, password=PASSPHRASE
    ).sign(model, out)


def test_a_model_signed_by_the_library_verifies_and_names_its_signer(
    signer: tuple[Path, Path], model: Path, tmp_path: Path
) -> None:
    key, pub = signer
    _library_sign(model, key, tmp_path / "net.sig")
    found = verify_model_signature(model, tmp_path / "net.sig", key=pub)
    assert found.signer == PublicKey.from_pem(pub.read_bytes()).keyid
    assert found.resources == ((".", hashlib.sha256(model.read_bytes()).hexdigest()),)
    assert found.signature_sha256 == hashlib.sha256((tmp_path / "net.sig").read_bytes()).hexdigest()


def test_a_model_signed_by_the_command_line_verifies(model: Path, tmp_path: Path) -> None:
    # model_signing 1.1's --password passes a str where cryptography wants bytes, so its
    # command line signs only with an unencrypted key: a publisher's key as that tool has it.
    private = ec.generate_private_key(ec.SECP256R1())
    key, pub = tmp_path / "cli.pem", tmp_path / "cli.pub"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(PublicKey.from_key(private.public_key()).to_pem())
    sign = [CLI, "sign", "key", str(model), "--private_key", str(key),
            "--signature", str(tmp_path / "cli.sig")]  # fmt: skip
    done = subprocess.run(sign, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    found = verify_model_signature(model, tmp_path / "cli.sig", key=pub)
    assert found.signer == PublicKey.from_key(private.public_key()).keyid


def test_one_changed_byte_in_the_model_is_refused(
    signer: tuple[Path, Path], model: Path, tmp_path: Path
) -> None:
    key, pub = signer
    _library_sign(model, key, tmp_path / "net.sig")
    data = bytearray(model.read_bytes())
    data[1000] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(ModelSignatureError, match="does not verify"):
        verify_model_signature(model, tmp_path / "net.sig", key=pub)


def test_a_signature_by_another_key_is_refused(
    signer: tuple[Path, Path], model: Path, tmp_path: Path
) -> None:
    key, _ = signer
    generate_key(tmp_path / "other", PASSPHRASE, "ecdsa-p256")
    _library_sign(model, key, tmp_path / "net.sig")
    with pytest.raises(ModelSignatureError, match="does not verify"):
        verify_model_signature(model, tmp_path / "net.sig", key=tmp_path / "other.pub")


def test_a_missing_signature_file_is_a_model_signature_error(
    signer: tuple[Path, Path], model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelSignatureError, match="cannot read"):
        verify_model_signature(model, tmp_path / "absent.sig", key=signer[1])


def test_a_garbage_signature_file_is_a_model_signature_error(
    signer: tuple[Path, Path], model: Path, tmp_path: Path
) -> None:
    (tmp_path / "bad.sig").write_bytes(b'{"mediaType": 1}')
    with pytest.raises(ModelSignatureError, match="does not verify"):
        verify_model_signature(model, tmp_path / "bad.sig", key=signer[1])


def test_a_signer_must_be_named_once() -> None:
    with pytest.raises(BuildError, match="not both"):
        verify_model_signature(Path("m"), Path("s"))


def test_what_edgeship_signs_the_command_line_verifies(
    signer: tuple[Path, Path], model: Path, tmp_path: Path
) -> None:
    key, pub = signer
    sign_model(model, tmp_path / "out.sig", private_key=key, password=PASSPHRASE)
    # Checked as a third party would: on a copy, with the standard tool.
    copy = tmp_path / "extracted" / "model.onnx"
    copy.parent.mkdir()
    shutil.copyfile(model, copy)
    verify = [CLI, "verify", "key", str(copy), "--signature", str(tmp_path / "out.sig"),
              "--public_key", str(pub)]  # fmt: skip
    done = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    copy.write_bytes(copy.read_bytes() + b"\0")
    done = subprocess.run(verify, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0


def test_an_ed25519_key_cannot_write_an_oms_signature(model: Path, tmp_path: Path) -> None:
    generate_key(tmp_path / "ed", PASSPHRASE, "ed25519")
    with pytest.raises(ModelSignatureError, match="ecdsa-p256"):
        sign_model(model, tmp_path / "out.sig", private_key=tmp_path / "ed", password=PASSPHRASE)


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, Any] | None
) -> x509.Certificate:
    """A CA certificate (``issuer`` None: self-signed) or a code-signing leaf."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def publisher_ca(tmp_path: Path) -> tuple[Path, Path, Path, str]:
    """(CA certificate, leaf certificate, leaf key) of a publisher, and the leaf's key id."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Publisher CA", ca_key, None)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate("Model publisher", leaf_key, (ca.subject, ca_key))
    key = tmp_path / "leaf.pem"
    key.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyid = PublicKey.from_key(leaf_key.public_key()).keyid
    return _pem(tmp_path / "ca.pem", ca), _pem(tmp_path / "leaf.crt", leaf), key, keyid


def test_a_certificate_signature_verifies_against_its_ca(
    publisher_ca: tuple[Path, Path, Path, str], model: Path, tmp_path: Path
) -> None:
    ca, leaf, key, keyid = publisher_ca
    model_signing.signing.Config().use_certificate_signer(
        private_key=key, signing_certificate=leaf, certificate_chain=[ca]
    ).sign(model, tmp_path / "net.sig")
    found = verify_model_signature(model, tmp_path / "net.sig", certificate_chain=[ca])
    assert (found.method, found.signer) == ("certificate", keyid)


def test_a_certificate_from_another_ca_is_refused(
    publisher_ca: tuple[Path, Path, Path, str], model: Path, tmp_path: Path
) -> None:
    ca, leaf, key, _ = publisher_ca
    model_signing.signing.Config().use_certificate_signer(
        private_key=key, signing_certificate=leaf, certificate_chain=[ca]
    ).sign(model, tmp_path / "net.sig")
    other = _pem(
        tmp_path / "other.pem",
        _certificate("Other CA", ec.generate_private_key(ec.SECP256R1()), None),
    )
    with pytest.raises(ModelSignatureError, match="does not verify"):
        verify_model_signature(model, tmp_path / "net.sig", certificate_chain=[other])
