"""Reading a manifest: schema v1, checked field by field with the one strict reader.

:func:`read_manifest` backs :meth:`agent.bundle.manifest.Manifest.from_json`. Every field
has one grammar (docs/bundle-format.md), matched in full; unknown fields are refused,
except top-level fields of a newer minor schema, which are kept as extensions.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime, timezone
from functools import partial
from typing import Any, Literal, cast

from agent.bundle._manifest_write import b64
from agent.bundle.manifest import (
    CASES_SINCE_MINOR,
    DTYPES,
    ENCRYPTION_SCHEME,
    FORMAT_RUNTIMES,
    HUMAN_VERSION_RE,
    HUMAN_VERSION_WHAT,
    MAX_GOLDEN_CASES,
    MAX_PROVIDER_TOLERANCES,
    NAME_RE,
    NAME_WHAT,
    PROVIDER_TOLERANCES_SINCE_MINOR,
    QUANT_SCHEMES,
    RUNTIMES,
    SCHEMA_MAJOR,
    SCHEMA_MINOR,
    SCHEMA_VERSION_RE,
    SCORES_OUTPUT_SINCE_MINOR,
    SHA256_RE,
    VERSION_RE,
    Compatibility,
    DriftFeatureRef,
    DriftReference,
    Encryption,
    FileEntry,
    GoldenCases,
    Health,
    Manifest,
    ModelCard,
    ModelSpec,
    Probation,
    Quantization,
    QuantParams,
    Recipient,
    RuntimeRequirement,
    TensorSpec,
    Tolerance,
    is_provider_name,
    is_safe_member_path,
)
from agent.errors import MalformedManifestError, SchemaVersionError
from agent.plumbing.strict import Doc, check_printable

__all__ = ["read_manifest"]

# Golden cases are a few requests replayed at every install; a bound keeps a hostile
# manifest from promising millions.
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def read_manifest(doc: object) -> Manifest:
    """Check a decoded JSON document against schema v1.

    Raises:
        SchemaVersionError: the manifest's major schema version is not ours.
        MalformedManifestError: it does not follow the schema.
    """
    root = Doc(doc, "manifest", error=MalformedManifestError)
    version = root.text("schema_version")
    m = SCHEMA_VERSION_RE.fullmatch(version)
    if not m:
        raise MalformedManifestError(f"schema_version {version!r} is not MAJOR.MINOR")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != SCHEMA_MAJOR:
        raise SchemaVersionError(
            f"manifest schema {version} is not readable by this agent (reads {SCHEMA_MAJOR}.x);"
            " upgrade the agent, or rebuild the bundle with an SDK that writes schema"
            f" {SCHEMA_MAJOR}.x"
        )
    strict = minor <= SCHEMA_MINOR
    root = Doc(doc, "manifest", error=MalformedManifestError, strict=strict)
    root.seen.add("schema_version")
    manifest = Manifest(
        schema_version=version,
        name=root.text("name", pattern=NAME_RE, what=NAME_WHAT),
        version=root.text("version", max_len=64, pattern=HUMAN_VERSION_RE, what=HUMAN_VERSION_WHAT),
        sequence=root.integer("sequence", minimum=0),
        created=_time(root, "created"),
        expires=root.opt(partial(_time, root), "expires"),
        compatibility=_parse_compat(root.obj("compatibility")),
        model=_parse_model(root.obj("model"), minor),
        quantization=_parse_quant(root.obj("quantization")),
        health=_parse_health(root.obj("health"), minor),
        drift_reference=_parse_drift(root.opt(root.obj, "drift_reference")),
        evaluation=root.opt(root.any_obj, "evaluation"),
        model_card=_parse_card(root.obj("model_card")),
        files=_parse_files(root.array("files")),
        encryption=_parse_encryption(root.opt(root.obj, "encryption")),
        extensions=_extensions(root),
    )
    root.done()
    _check_consistency(manifest)
    return manifest


def _extensions(root: Doc) -> dict[str, Any]:
    """Top-level fields of a newer minor schema: kept verbatim, but printable."""
    extra = {k: v for k, v in root.value.items() if k not in root.seen}
    check_printable(extra, "manifest", error=MalformedManifestError)
    return extra


def _sha256(o: Doc, key: str) -> str:
    return o.text(key, max_len=64, pattern=SHA256_RE, what="64 lowercase hex digits")


def _member_path(o: Doc, key: str) -> str:
    v = o.text(key)
    if not is_safe_member_path(v):
        raise o.bad(key, "a safe relative member path")
    return v


def _time(o: Doc, key: str) -> datetime:
    v = o.text(key, max_len=32, pattern=_TIME_RE, what="a UTC time like 2026-01-31T12:00:00Z")
    try:
        t = datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise o.bad(key, "a UTC time like 2026-01-31T12:00:00Z") from None
    return t.replace(tzinfo=timezone.utc)


_X25519_P = 2**255 - 19
# The u-coordinates of small order on curve25519 and its twist, canonically encoded (the
# non-canonical p and p + 1 fail the range check first): any of them makes the shared
# secret all zeros, whatever the device's key.
_X25519_LOW_ORDER = frozenset(
    {0, 1, _X25519_P - 1}
    | {
        int.from_bytes(bytes.fromhex(h), "little")
        for h in (
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        )
    }
)


def is_usable_x25519(public: bytes) -> bool:
    """Whether 32 bytes are a canonical X25519 public key of large order.

    RFC 7748 lets X25519 accept any 32 bytes; a key that the protocol must not use (a
    low-order point, which fixes the shared secret, or a non-canonical spelling, which no
    honest encoder writes) is refused here, when the manifest is read, before any key
    exchange, and without loading a cryptography library.
    """
    u = int.from_bytes(public, "little")
    return len(public) == 32 and u < _X25519_P and u not in _X25519_LOW_ORDER


def _parse_encryption(o: Doc | None) -> Encryption | None:
    if o is None:
        return None
    scheme = o.text("scheme", max_len=64)
    if scheme != ENCRYPTION_SCHEME:
        raise MalformedManifestError(
            f"{o.where}.scheme {scheme!r} is unknown; this agent decrypts {ENCRYPTION_SCHEME}"
        )

    def raw(item: Doc, key: str, size: int) -> bytes:
        text = item.text(key, max_len=128)
        try:
            data = base64.b64decode(text, validate=True)
        except ValueError:
            data = b""
        if len(data) != size or b64(data) != text:
            raise MalformedManifestError(
                f"{item.where}.{key} must be {size} bytes in canonical base64"
            )
        return data

    recipients = []
    for r in o.items("recipients", max_len=1024):
        ephemeral = raw(r, "ephemeral_public", 32)
        if not is_usable_x25519(ephemeral):
            raise MalformedManifestError(
                f"{r.where}.ephemeral_public is not a usable X25519 public key (a low-order"
                " point or a non-canonical encoding); rebuild the bundle"
            )
        recipients.append(Recipient(_sha256(r, "key_id"), ephemeral, raw(r, "wrapped_key", 48)))
        r.done()
    if not recipients:
        raise MalformedManifestError(f"{o.where}.recipients must name at least one device key")
    if len({r.key_id for r in recipients}) != len(recipients):
        raise MalformedManifestError(f"{o.where}.recipients names a key id twice")
    table = o.obj("nonces")
    nonces = {}
    for path in sorted(table.value):
        if not is_safe_member_path(path):
            raise MalformedManifestError(f"{table.where} names {path!r}, not a safe member path")
        nonces[path] = raw(table, path, 12)
    table.seen.update(table.value)
    if len(set(nonces.values())) != len(nonces):
        raise MalformedManifestError(f"{table.where} uses a nonce twice")
    o.done()
    return Encryption(recipients=tuple(recipients), nonces=nonces, scheme=scheme)


def _parse_tensor(o: Doc) -> TensorSpec:
    dtype = o.choice("dtype", tuple(sorted(DTYPES)))
    dims = o.array("shape", max_len=16)
    shape: list[int | None] = []
    for d in dims:
        if d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 1):
            shape.append(d)
        else:
            raise MalformedManifestError(f"{o.where}.shape dims must be positive integers or null")
    quant = None
    q = o.opt(o.obj, "quantization")
    if q is not None:
        quant = QuantParams(
            scale=q.number("scale", minimum=0.0), zero_point=q.integer("zero_point")
        )
        if quant.scale == 0.0:
            raise MalformedManifestError(f"{q.where}.scale must be > 0")
        q.done()
    spec = TensorSpec(
        name=o.text("name", max_len=256), dtype=dtype, shape=tuple(shape), quantization=quant
    )
    o.done()
    return spec


def _parse_model(o: Doc, minor: int) -> ModelSpec:
    fmt = o.choice("format", tuple(sorted(FORMAT_RUNTIMES)))
    spec = ModelSpec(
        format=cast(Literal["onnx", "tflite"], fmt),
        file=_member_path(o, "file"),
        inputs=tuple(_parse_tensor(t) for t in o.items("inputs", max_len=64)),
        outputs=tuple(_parse_tensor(t) for t in o.items("outputs", max_len=64)),
        # Not read from an older minor: there the strict reader refuses it as unknown.
        scores_output=(
            o.opt(o.text, "scores_output", max_len=256)
            if minor >= SCORES_OUTPUT_SINCE_MINOR
            else None
        ),
        request_elements=(
            o.opt(o.integer, "request_elements", minimum=1) if minor >= CASES_SINCE_MINOR else None
        ),
    )
    o.done()
    if not spec.inputs or not spec.outputs:
        raise MalformedManifestError(f"{o.where} needs at least one input and one output")
    if spec.scores_output is not None and spec.scores_output not in {t.name for t in spec.outputs}:
        raise MalformedManifestError(f"{o.where}.scores_output must name one of its outputs")
    return spec


def _parse_version(o: Doc, key: str) -> str | None:
    return o.opt(o.text, key, max_len=32, pattern=VERSION_RE, what="a version like 1.17 or 2.14.0")


def _parse_compat(o: Doc) -> Compatibility:
    runtimes = []
    for r in o.items("runtimes", max_len=8):
        name = r.choice("name", RUNTIMES)
        runtimes.append(
            RuntimeRequirement(
                name, _parse_version(r, "min_version"), _parse_version(r, "max_version")
            )
        )
        r.done()
    compat = Compatibility(
        runtimes=tuple(runtimes), arch=o.texts("arch"), device_classes=o.texts("device_classes")
    )
    o.done()
    if not compat.runtimes:
        raise MalformedManifestError(f"{o.where}.runtimes must name at least one runtime")
    return compat


def _parse_quant(o: Doc) -> Quantization:
    scheme = o.choice("scheme", tuple(sorted(QUANT_SCHEMES)))
    q = Quantization(
        scheme=scheme,
        calibration_sha256=o.opt(partial(_sha256, o), "calibration_sha256"),
        details=o.any_obj("details"),
    )
    o.done()
    return q


def _parse_tolerance(tol: Doc) -> Tolerance:
    tolerance = Tolerance(
        atol=tol.number("atol", minimum=0.0), rtol=tol.number("rtol", minimum=0.0)
    )
    tol.done()
    return tolerance


def _parse_tolerances(table: Doc) -> dict[str, Tolerance]:
    """Output name -> tolerance (the names are checked against the model's outputs later)."""
    tolerances = {name: _parse_tolerance(table.obj(name)) for name in sorted(table.value)}
    table.done()
    return tolerances


def _parse_provider_tolerances(o: Doc, minor: int) -> dict[str, dict[str, Tolerance]]:
    # Not read from an older minor: there the strict reader refuses it as unknown.
    if minor < PROVIDER_TOLERANCES_SINCE_MINOR:
        return {}
    table = o.obj("provider_tolerances")
    if len(table.value) > MAX_PROVIDER_TOLERANCES:
        raise MalformedManifestError(
            f"{table.where} must name at most {MAX_PROVIDER_TOLERANCES} providers"
        )
    out = {}
    for provider in sorted(table.value):
        # Checked against the model's format later; here before it is part of any message.
        if not any(is_provider_name(provider, f) for f in FORMAT_RUNTIMES):
            raise MalformedManifestError(f"{table.where} names {provider!r}, not a provider")
        out[provider] = _parse_tolerances(table.obj(provider))
        if not out[provider]:
            raise MalformedManifestError(f"{table.path(provider)} must name at least one output")
    table.done()
    return out


def _parse_cases(o: Doc | None) -> GoldenCases | None:
    if o is None:
        return None
    tolerances = _parse_tolerances(o.obj("tolerances"))
    cases = GoldenCases(
        count=o.integer("count", minimum=1, maximum=MAX_GOLDEN_CASES),
        inputs=_member_path(o, "inputs"),
        expected=_member_path(o, "expected"),
        tolerances=tolerances,
    )
    o.done()
    return cases


def _parse_health(o: Doc, minor: int) -> Health:
    tolerance = _parse_tolerance(o.obj("tolerance"))
    p = o.obj("probation")
    probation = Probation(
        requests=p.integer("requests", minimum=0),
        seconds=p.number("seconds", minimum=0.0),
        max_error_rate=p.number("max_error_rate", minimum=0.0),
        max_p95_ms=p.opt(p.number, "max_p95_ms", minimum=0.0),
    )
    p.done()
    health = Health(
        golden_inputs=_member_path(o, "golden_inputs"),
        expected_outputs=_member_path(o, "expected_outputs"),
        tolerance=tolerance,
        latency_budget_p95_ms=o.opt(o.number, "latency_budget_p95_ms", minimum=0.0),
        probation=probation,
        # Not read from an older minor: there the strict reader refuses it as unknown.
        cases=_parse_cases(o.opt(o.obj, "cases")) if minor >= CASES_SINCE_MINOR else None,
        provider_tolerances=_parse_provider_tolerances(o, minor),
    )
    o.done()
    return health


def _parse_drift(o: Doc | None) -> DriftReference | None:
    if o is None:
        return None
    groups_obj = o.any_obj("groups")
    groups: dict[str, int] = {}
    for name, count in groups_obj.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise MalformedManifestError(f"{o.where}.groups.{name} must be a positive integer")
        groups[name] = count
    features = []
    for f in o.items("features", max_len=4096):
        ref = DriftFeatureRef(
            input=f.text("input", max_len=256),
            index=f.integer("index", minimum=0),
            edges=f.numbers("edges", max_len=64),
            fractions=f.numbers("fractions", max_len=65),
            mean=f.number("mean"),
            std=f.number("std", minimum=0.0),
        )
        f.done()
        if len(ref.fractions) != len(ref.edges) + 1 or list(ref.edges) != sorted(ref.edges):
            raise MalformedManifestError(
                f"{f.where} needs ascending edges and one more fraction than edges"
            )
        if ref.input not in groups or ref.index >= groups[ref.input]:
            raise MalformedManifestError(f"{f.where} names a feature outside drift groups")
        features.append(ref)
    drift = DriftReference(
        sample_count=o.integer("sample_count", minimum=0), groups=groups, features=tuple(features)
    )
    o.done()
    return drift


def _parse_card(o: Doc) -> ModelCard:
    card = ModelCard(
        description=o.text("description"),
        intended_use=o.text("intended_use"),
        data_sources=o.texts("data_sources"),
        limitations=o.text("limitations"),
        retraining_triggers=o.texts("retraining_triggers"),
        owners=o.texts("owners"),
        license=o.text("license", max_len=256),
    )
    o.done()
    return card


def _parse_files(items: list[Any]) -> tuple[FileEntry, ...]:
    entries = []
    for i, item in enumerate(items):
        o = Doc(item, f"manifest.files[{i}]", error=MalformedManifestError)
        entries.append(
            FileEntry(
                path=_member_path(o, "path"),
                size=o.integer("size", minimum=0),
                sha256=_sha256(o, "sha256"),
            )
        )
        o.done()
    paths = [e.path for e in entries]
    if paths != sorted(paths) or len(set(paths)) != len(paths):
        raise MalformedManifestError("manifest.files must be sorted by path without duplicates")
    return tuple(entries)


def _check_consistency(m: Manifest) -> None:
    listed = {f.path for f in m.files}
    roles = [
        ("model.file", m.model.file),
        ("health.golden_inputs", m.health.golden_inputs),
        ("health.expected_outputs", m.health.expected_outputs),
    ]
    cases = m.health.cases
    tables = {f"health.provider_tolerances.{p}": t for p, t in m.health.provider_tolerances.items()}
    if cases is not None:
        roles += [("health.cases.inputs", cases.inputs), ("health.cases.expected", cases.expected)]
        tables["health.cases.tolerances"] = cases.tolerances
    for where, table in sorted(tables.items()):
        unknown = sorted(set(table) - {t.name for t in m.model.outputs})
        if unknown:
            raise MalformedManifestError(
                f"manifest {where} names {unknown}, which are not model outputs"
            )
    for provider in sorted(m.health.provider_tolerances):
        if not is_provider_name(provider, m.model.format):
            raise MalformedManifestError(
                f"manifest health.provider_tolerances names {provider!r}, which is not"
                + (
                    " an onnxruntime execution provider (such as OpenVINOExecutionProvider)"
                    if m.model.format == "onnx"
                    else " xnnpack, cpu or the absolute path of a delegate library"
                )
            )
    for role, path in roles:
        if path not in listed:
            raise MalformedManifestError(f"manifest {role} {path!r} is not listed in files")
    # A file path may not also be a directory of another path.
    for path in listed:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in listed:
                raise MalformedManifestError(f"manifest files: {path!r} is inside another file")
    usable = {r.name for r in m.compatibility.runtimes}
    if not usable & set(FORMAT_RUNTIMES[m.model.format]):
        raise MalformedManifestError(
            f"compatibility.runtimes {sorted(usable)} cannot run a {m.model.format} model"
        )
    if m.expires is not None and m.expires <= m.created:
        raise MalformedManifestError("manifest expires must be after created")
    if m.encryption is not None and set(m.encryption.nonces) != listed:
        raise MalformedManifestError(
            "manifest encryption.nonces must name exactly the files listed: every payload file"
            " of an encrypted bundle is encrypted"
        )
