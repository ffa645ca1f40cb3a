"""OpenSSF Model Signing (OMS v1.0) both ways, through the ``model-signing`` package.

In: a publisher's signature of the source model is checked before the build reads the
model (:func:`verify_model_signature`); what it established goes into the bundle's
provenance. Out: the bundled model file can carry an OMS signature of its own
(:func:`sign_model`), so anyone can check an extracted model with the ``model_signing``
command line, without edgeship.

``model-signing`` is an optional build-side dependency (``pip install 'edgeship[oms]'``);
it is imported only when one of these functions runs, never by the agent. Only key and
certificate modes are offered: Sigstore keyless signing needs an OIDC flow and a
transparency log, which a build machine without network cannot reach.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sdk.errors import BuildError, ModelSignatureError

__all__ = ["UpstreamSignature", "sign_model", "verify_model_signature"]

_INSTALL_HINT = "OpenSSF model signatures need the oms extra: pip install 'edgeship[oms]'"
_MAX_SIGNATURE_BYTES = 1 << 20


@dataclass(frozen=True)
class UpstreamSignature:
    """What a verified OMS signature of the source model established.

    ``signer`` is the key id of the key that signed, in edgeship's own form (sha256 of the
    DER SubjectPublicKeyInfo), so it can be compared with ``edgeship trust`` key ids;
    ``resources`` are the (name, sha256) pairs the signature covers, as the publisher
    signed them (a single-file model is the one resource ``.``).
    """

    method: Literal["key", "certificate"]
    signer: str
    signature_sha256: str
    resources: tuple[tuple[str, str], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "standard": "OpenSSF Model Signing v1.0",
            "method": self.method,
            "signer": self.signer,
            "signature_sha256": self.signature_sha256,
            "resources": [{"name": n, "sha256": d} for n, d in self.resources],
        }


def _model_signing() -> Any:
    try:
        import model_signing  # noqa: PLC0415  (optional, build-side only)
    except ImportError:
        raise BuildError(_INSTALL_HINT) from None
    return model_signing


def verify_model_signature(
    model: Path,
    signature: Path,
    *,
    key: Path | None = None,
    certificate_chain: Sequence[Path] = (),
) -> UpstreamSignature:
    """Check an OMS signature of ``model`` with a public key or a certificate chain.

    ``key`` is a PEM public key (ECDSA; the key mode of OMS); with ``certificate_chain``,
    the signature must carry a signing certificate that chains to those certificates.

    Raises:
        ModelSignatureError: no signature file, a signature that does not verify, or a
            model that does not match what was signed.
        BuildError: ``model-signing`` is not installed, or neither or both of ``key`` and
            ``certificate_chain`` were given.
    """
    if (key is None) == (not certificate_chain):
        raise BuildError("give the model signer as --model-key or --model-certificate, not both")
    ms = _model_signing()
    raw = _read_signature(signature)
    config = ms.verifying.Config()
    if key is not None:
        config = config.use_elliptic_key_verifier(public_key=key)
    else:
        config = config.use_certificate_verifier(certificate_chain=list(certificate_chain))
    try:
        config.verify(model, signature)
    except Exception as exc:  # noqa: BLE001  (model-signing raises ValueError and its deps' own types)
        raise ModelSignatureError(
            f"the model signature {signature} does not verify for {model}: {_first_line(exc)};"
            " check that the signature, the model and the signer's key belong together"
        ) from None
    bundle = json.loads(raw)
    return UpstreamSignature(
        method="key" if key is not None else "certificate",
        signer=_signer_keyid(bundle, key),
        signature_sha256=hashlib.sha256(raw).hexdigest(),
        resources=_resources(bundle),
    )


def sign_model(model: Path, signature: Path, *, private_key: Path, password: bytes | None) -> None:
    """Write an OMS signature of ``model`` (key mode) to ``signature``.

    Raises:
        ModelSignatureError: the key is not an ECDSA key OMS can sign with.
        BuildError: ``model-signing`` is not installed.
    """
    ms = _model_signing()
    try:
        ms.signing.Config().use_elliptic_key_signer(
            private_key=private_key, password=password
        ).sign(model, signature)
    except Exception as exc:  # noqa: BLE001  (key loading and signing errors of several libraries)
        raise ModelSignatureError(
            f"cannot write an OpenSSF model signature with {private_key}: {_first_line(exc)};"
            " --oms needs an ECDSA P-256 key (edgeship keygen --type ecdsa-p256)"
        ) from None


def _read_signature(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_SIGNATURE_BYTES + 1)
    except OSError as exc:
        raise ModelSignatureError(
            f"cannot read the model signature {path}: {exc.strerror}"
        ) from None
    if len(raw) > _MAX_SIGNATURE_BYTES:
        raise ModelSignatureError(f"{path} is larger than any model signature (1 MiB)")
    return raw


def _statement(bundle: dict[str, Any]) -> dict[str, Any]:
    payload = bundle["dsseEnvelope"]["payload"]
    statement: dict[str, Any] = json.loads(base64.b64decode(payload, validate=True))
    return statement


def _resources(bundle: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The (name, sha256) pairs the verified statement lists (already checked against the
    model by ``model-signing``; read here only to record them)."""
    try:
        items = _statement(bundle)["predicate"]["resources"]
        return tuple(sorted((str(r["name"]), str(r["digest"])) for r in items))
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise ModelSignatureError("the model signature's statement lists no resources") from None


def _signer_keyid(bundle: dict[str, Any], key: Path | None) -> str:
    """edgeship's key id of the public key that signed: the given key, or the signing
    certificate's key."""
    if key is not None:
        public = serialization.load_pem_public_key(key.read_bytes())
    else:
        try:
            der = base64.b64decode(bundle["verificationMaterial"]["certificate"]["rawBytes"])
        except (KeyError, TypeError, binascii.Error):
            der = base64.b64decode(
                bundle["verificationMaterial"]["x509CertificateChain"]["certificates"][0][
                    "rawBytes"
                ]
            )
        public = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ModelSignatureError("the model signer's key is not an elliptic-curve key")
    # edgeship's key id (agent.bundle.signing), also for curves bundles do not use.
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
