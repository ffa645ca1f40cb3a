"""The provenance side of ``edgeship build``, ``inspect`` and ``verify``: options for the
source model's OpenSSF signature and for signing the bundled model, and the provenance
statement read back from a bundle for people and scripts."""

from __future__ import annotations

import argparse
import hashlib
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from rich.table import Table

from agent.bundle.manifest import Manifest
from agent.errors import ConfigError, EdgeshipError
from agent.plumbing.strict import check_printable
from sdk.build import ProvenanceOptions, SigningKey
from sdk.build.provenance import PROVENANCE_PATH, parse_statement

__all__ = ["add_options", "from_unverified", "from_verified", "options", "source_line", "table"]

_MAX_STATEMENT_BYTES = 1 << 20


def add_options(p: argparse.ArgumentParser) -> None:
    """The provenance options of ``edgeship build``."""
    g = p.add_argument_group(
        "provenance (every bundle records where its model came from; docs/building.md)"
    )
    g.add_argument(
        "--model-source",
        metavar="URI",
        help="where the model came from, as recorded (default: the MODEL path as given)",
    )
    g.add_argument(
        "--model-signature",
        type=Path,
        metavar="SIG",
        help="OpenSSF model signature of MODEL, checked before anything else runs",
    )
    g.add_argument("--model-key", type=Path, metavar="KEY.pub", help="the model signer's key")
    g.add_argument(
        "--model-certificate",
        type=Path,
        action="append",
        default=[],
        metavar="CERT",
        help="certificate(s) the model signer's certificate chains to (repeat)",
    )
    g.add_argument(
        "--oms",
        action="store_true",
        help="also sign the bundled model with OpenSSF Model Signing (needs an ECDSA --key)",
    )
    g.add_argument(
        "--builder-id",
        metavar="ID",
        help="who builds, as recorded (default: $EDGESHIP_BUILDER_ID, else local:USER@HOST)",
    )


def options(
    args: argparse.Namespace, keys: Sequence[SigningKey], passphrase: bytes | None
) -> ProvenanceOptions:
    """The build's provenance options from the command line.

    Raises:
        ConfigError: ``--oms`` without an ECDSA P-256 signing key.
    """
    oms_key = None
    if args.oms:
        oms_key = next(
            (
                path
                for path, key in zip(args.key, keys, strict=True)
                if isinstance(key.private, ec.EllipticCurvePrivateKey)
            ),
            None,
        )
        if oms_key is None:
            raise ConfigError(
                "--oms signs with an ECDSA P-256 key and none of the --key files is one;"
                " make one with edgeship keygen --type ecdsa-p256"
            )
    return ProvenanceOptions(
        model_source=args.model_source,
        model_signature=args.model_signature,
        model_key=args.model_key,
        model_certificates=tuple(args.model_certificate),
        oms_key=oms_key,
        oms_password=passphrase if oms_key is not None else None,
        builder=args.builder_id,
    )


def _checked(data: bytes) -> dict[str, Any]:
    statement = parse_statement(data)
    check_printable(statement, PROVENANCE_PATH, error=ConfigError)
    return statement


def _member(bundle: Path) -> bytes | None:
    """The provenance member's bytes, read straight from the tar (no extraction)."""
    try:
        with tarfile.open(bundle, mode="r:") as tar:
            member = next((m for m in tar if m.name == PROVENANCE_PATH), None)
            if member is None or not member.isfile() or member.size > _MAX_STATEMENT_BYTES:
                return None
            f = tar.extractfile(member)
            return f.read() if f is not None else None
    except (OSError, tarfile.TarError):
        return None


def from_unverified(bundle: Path) -> dict[str, Any] | None:
    """The provenance statement of a bundle, read WITHOUT verifying it (for ``inspect``),
    or None when the bundle carries none, or none that can be shown (encrypted)."""
    data = _member(bundle)
    if data is None:
        return None
    try:
        return _checked(data)
    except EdgeshipError:
        return None


def from_verified(bundle: Path, manifest: Manifest) -> dict[str, Any] | None:
    """The provenance statement of a bundle that just verified: the member read again must
    have the digest its signed manifest lists. None when the bundle carries none.

    Raises:
        ConfigError: the member changed since it was verified, or is not a statement.
    """
    entry = next((f for f in manifest.files if f.path == PROVENANCE_PATH), None)
    if entry is None or manifest.encryption is not None:
        return None
    data = _member(bundle)
    if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ConfigError(f"{bundle} changed while it was read; verify it again")
    return _checked(data)


def source_line(statement: dict[str, Any] | None) -> str:
    """One line for ``verify``: the source model's digest and who signed it, if anyone."""
    if statement is None:
        return ""
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    model = next((d for d in deps if d.get("name") == "model"), None)
    if model is None:
        return ""
    signed = model.get("annotations", {}).get("signature")
    signer = f", OpenSSF-signed by {signed['signer'][:16]}…" if signed else ""
    return f"\nsource model sha256:{model['digest']['sha256']}{signer}"


def table(statement: dict[str, Any]) -> Table:
    """Where the model came from, for people: source, data, signature, builder, tools."""
    out = Table(title="provenance (in-toto statement, SLSA provenance v1)", show_header=False)
    out.add_column("field", style="bold")
    out.add_column("value")
    predicate = statement.get("predicate", {})
    definition = predicate.get("buildDefinition", {})
    for dep in definition.get("resolvedDependencies", []):
        digest = dep.get("digest", {}).get("sha256", "?")
        out.add_row(str(dep.get("name")), f"{dep.get('uri', '')}  sha256:{digest[:16]}…")
        signature = dep.get("annotations", {}).get("signature")
        if signature:
            out.add_row(
                "  signed by",
                f"{signature.get('method')} {str(signature.get('signer', ''))[:16]}…"
                f" ({signature.get('standard')})",
            )
    training = definition.get("externalParameters", {}).get("training")
    if training:
        out.add_row("training", ", ".join(f"{k}={v}" for k, v in sorted(training.items())))
    run = predicate.get("runDetails", {})
    builder = run.get("builder", {})
    out.add_row("builder", str(builder.get("id", "")))
    tools = builder.get("version", {})
    out.add_row("tools", ", ".join(f"{k} {v}" for k, v in sorted(tools.items())))
    out.add_row("built", str(run.get("metadata", {}).get("startedOn", "")))
    return out
