"""The bundle manifest: schema v1, strict parsing, canonical bytes.

The manifest is the signed statement of what a bundle is. :meth:`Manifest.from_bytes`
accepts only well-formed UTF-8 JSON that follows the schema exactly; a manifest written
for a newer *minor* schema may carry fields this version does not know, which are kept in
:attr:`Manifest.extensions` (and nested unknown fields ignored); a newer *major* schema is
refused with :class:`~agent.errors.SchemaVersionError`.

See docs/bundle-format.md for the normative description.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast

from agent.errors import MalformedManifestError, SchemaVersionError

__all__ = [
    "DTYPES",
    "FORMAT_RUNTIMES",
    "MANIFEST_PATH",
    "PAYLOAD_TYPE",
    "RUNTIMES",
    "SCHEMA_VERSION",
    "SIGNATURE_PATH",
    "Compatibility",
    "DriftFeatureRef",
    "DriftReference",
    "FileEntry",
    "Health",
    "Manifest",
    "ModelCard",
    "ModelSpec",
    "Probation",
    "QuantParams",
    "Quantization",
    "RuntimeRequirement",
    "TensorSpec",
    "Tolerance",
    "format_time",
    "is_safe_member_path",
]

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 0
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
PAYLOAD_TYPE = "application/vnd.edgeship.manifest+json"
MANIFEST_PATH = "manifest.json"
SIGNATURE_PATH = "manifest.sig"

DTYPES = frozenset(
    {"bool", "int8", "uint8", "int16", "uint16", "int32", "int64", "float16", "float32", "float64"}
)
RUNTIMES = ("onnxruntime", "litert", "tflite-runtime")
# Which runtimes can execute which model file format.
FORMAT_RUNTIMES: Mapping[str, tuple[str, ...]] = {
    "onnx": ("onnxruntime",),
    "tflite": ("litert", "tflite-runtime"),
}
QUANT_SCHEMES = frozenset({"none", "dynamic", "static", "weight-only"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PATH_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_VERSION_RE = re.compile(r"^\d+(\.\d+)*$")
MAX_MEMBER_PATH_BYTES = 100  # fits a plain ustar name field: no pax or GNU extensions


def is_safe_member_path(path: str) -> bool:
    """True for a relative POSIX path of plain components, short enough for ustar."""
    if not path or len(path.encode("utf-8")) > MAX_MEMBER_PATH_BYTES:
        return False
    if path in (MANIFEST_PATH, SIGNATURE_PATH):
        return False
    return all(_PATH_COMPONENT_RE.match(part) for part in path.split("/"))


def format_time(t: datetime) -> str:
    """RFC 3339 UTC with a trailing ``Z`` and whole seconds: the manifest's time format."""
    return t.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- typed parts -------------------------------------------------------------------


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of an int8/uint8 model input or output: real = scale * (q - zp)."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``None`` in ``shape`` marks a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    # Set when the model's tensor is integer-quantized but callers exchange floats.
    quantization: QuantParams | None = None


@dataclass(frozen=True)
class ModelSpec:
    format: Literal["onnx", "tflite"]
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class RuntimeRequirement:
    """A runtime that can execute the model, with an inclusive lower and exclusive upper bound."""

    name: str
    min_version: str | None = None
    max_version: str | None = None


@dataclass(frozen=True)
class Compatibility:
    # In order of preference: the agent uses the first one installed that fits.
    runtimes: tuple[RuntimeRequirement, ...]
    arch: tuple[str, ...] = ()  # empty: any architecture
    device_classes: tuple[str, ...] = ()  # empty: any device class


@dataclass(frozen=True)
class Quantization:
    scheme: str = "none"
    calibration_sha256: str | None = None
    # Free-form details of how it was done (recipe, per-channel, tool versions).
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tolerance:
    """Golden outputs match when ``|actual - expected| <= atol + rtol * |expected|``."""

    atol: float
    rtol: float = 0.0


@dataclass(frozen=True)
class Probation:
    """After activation, a breach within this window rolls the model back."""

    requests: int = 100
    seconds: float = 60.0
    max_error_rate: float = 0.05
    max_p95_ms: float | None = None


@dataclass(frozen=True)
class Health:
    golden_inputs: str  # payload path of an .npz keyed by input name
    expected_outputs: str  # payload path of an .npz keyed by output name
    tolerance: Tolerance
    latency_budget_p95_ms: float | None = None
    probation: Probation = field(default_factory=Probation)


@dataclass(frozen=True)
class DriftFeatureRef:
    """Reference distribution of one summarised input feature (see :class:`DriftReference`)."""

    input: str
    index: int
    edges: tuple[float, ...]  # ascending inner bin edges; bins are (-inf, e0], ..., (eN, inf)
    fractions: tuple[float, ...]  # len(edges) + 1 reference bin fractions, summing to 1
    mean: float
    std: float


@dataclass(frozen=True)
class DriftReference:
    """Per-feature statistics of the calibration data.

    A sample of input ``x`` is flattened to ``F`` values and cut into ``groups`` contiguous
    slices of near-equal length; feature ``i`` is the mean of slice ``i``. Narrow inputs use
    ``groups == F`` (one feature per element), wide ones are summarised so the reference
    stays small whatever the input width.
    """

    sample_count: int
    groups: Mapping[str, int]  # input name -> number of features
    features: tuple[DriftFeatureRef, ...]


@dataclass(frozen=True)
class ModelCard:
    description: str = ""
    intended_use: str = ""
    data_sources: tuple[str, ...] = ()
    limitations: str = ""
    retraining_triggers: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()
    license: str = ""


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


ENCRYPTION_SCHEME = "x25519-hkdf-sha256+aes-256-gcm"


@dataclass(frozen=True)
class Recipient:
    """The bundle's data key, wrapped for one device key (see :mod:`agent.bundle.crypto`)."""

    key_id: str  # sha256 of the recipient's raw 32-byte X25519 public key, hex
    ephemeral_public: bytes  # 32 bytes
    wrapped_key: bytes  # the 32-byte data key, AES-256-GCM sealed: 48 bytes


@dataclass(frozen=True)
class Encryption:
    """Every payload file is AES-256-GCM ciphertext; ``files`` sizes and digests are of it."""

    recipients: tuple[Recipient, ...]
    nonces: Mapping[str, bytes]  # payload path -> its 12-byte nonce
    scheme: str = ENCRYPTION_SCHEME


@dataclass(frozen=True)
class Manifest:
    """A parsed, schema-checked manifest. Create with :meth:`from_bytes` or the constructor."""

    name: str
    version: str
    sequence: int
    created: datetime
    compatibility: Compatibility
    model: ModelSpec
    health: Health
    files: tuple[FileEntry, ...]
    expires: datetime | None = None
    quantization: Quantization = field(default_factory=Quantization)
    drift_reference: DriftReference | None = None
    evaluation: Mapping[str, Any] | None = None
    model_card: ModelCard = field(default_factory=ModelCard)
    encryption: Encryption | None = None
    schema_version: str = SCHEMA_VERSION
    # Top-level fields of a newer minor schema, kept verbatim and otherwise ignored.
    extensions: Mapping[str, Any] = field(default_factory=dict)

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``. Raises: KeyError if the manifest does not list it."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def with_files(self, files: tuple[FileEntry, ...]) -> Manifest:
        return replace(self, files=tuple(sorted(files, key=lambda f: f.path)))

    # --- serialisation ---------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extensions)
        out.update(
            {
                "schema_version": self.schema_version,
                "name": self.name,
                "version": self.version,
                "sequence": self.sequence,
                "created": format_time(self.created),
                "expires": format_time(self.expires) if self.expires else None,
                "compatibility": {
                    "runtimes": [
                        {"name": r.name, "min_version": r.min_version, "max_version": r.max_version}
                        for r in self.compatibility.runtimes
                    ],
                    "arch": list(self.compatibility.arch),
                    "device_classes": list(self.compatibility.device_classes),
                },
                "model": {
                    "format": self.model.format,
                    "file": self.model.file,
                    "inputs": [_tensor_to_json(t) for t in self.model.inputs],
                    "outputs": [_tensor_to_json(t) for t in self.model.outputs],
                },
                "quantization": {
                    "scheme": self.quantization.scheme,
                    "calibration_sha256": self.quantization.calibration_sha256,
                    "details": dict(self.quantization.details),
                },
                "health": {
                    "golden_inputs": self.health.golden_inputs,
                    "expected_outputs": self.health.expected_outputs,
                    "tolerance": {
                        "atol": self.health.tolerance.atol,
                        "rtol": self.health.tolerance.rtol,
                    },
                    "latency_budget_p95_ms": self.health.latency_budget_p95_ms,
                    "probation": {
                        "requests": self.health.probation.requests,
                        "seconds": self.health.probation.seconds,
                        "max_error_rate": self.health.probation.max_error_rate,
                        "max_p95_ms": self.health.probation.max_p95_ms,
                    },
                },
                "drift_reference": _drift_to_json(self.drift_reference),
                "evaluation": dict(self.evaluation) if self.evaluation is not None else None,
                "model_card": {
                    "description": self.model_card.description,
                    "intended_use": self.model_card.intended_use,
                    "data_sources": list(self.model_card.data_sources),
                    "limitations": self.model_card.limitations,
                    "retraining_triggers": list(self.model_card.retraining_triggers),
                    "owners": list(self.model_card.owners),
                    "license": self.model_card.license,
                },
                "files": [
                    {"path": f.path, "size": f.size, "sha256": f.sha256}
                    for f in sorted(self.files, key=lambda f: f.path)
                ],
            }
        )
        if self.encryption is not None:  # absent, not null: plain manifests stay as they were
            e = self.encryption
            out["encryption"] = {
                "scheme": e.scheme,
                "recipients": [
                    {
                        "key_id": r.key_id,
                        "ephemeral_public": _b64(r.ephemeral_public),
                        "wrapped_key": _b64(r.wrapped_key),
                    }
                    for r in e.recipients
                ],
                "nonces": {path: _b64(n) for path, n in sorted(e.nonces.items())},
            }
        return out

    def to_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, no insignificant whitespace, UTF-8, trailing newline."""
        text = json.dumps(
            self.to_json(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
        return text.encode("utf-8") + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and check a manifest.

        Raises:
            SchemaVersionError: the manifest's major schema version is newer than ours.
            MalformedManifestError: not UTF-8 JSON, or not following the schema.
        """
        try:
            text = data.decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise MalformedManifestError(f"manifest is not valid UTF-8: {exc}") from None
        try:
            doc = json.loads(
                text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
            )
        # RecursionError: deeply nested arrays; read_unverified parses unsigned manifests.
        except (ValueError, RecursionError) as exc:
            raise MalformedManifestError(f"manifest is not valid JSON: {exc}") from None
        return cls.from_json(doc)

    @classmethod
    def from_json(cls, doc: object) -> Manifest:
        """Check a decoded JSON document against schema v1. Raises: as :meth:`from_bytes`."""
        root = _Obj(doc, "manifest", strict=True)
        version = root.text("schema_version")
        m = re.fullmatch(r"(\d+)\.(\d+)", version)
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
        root = _Obj(doc, "manifest", strict=strict)
        root.seen.add("schema_version")
        manifest = cls(
            schema_version=version,
            name=root.name("name"),
            version=root.text("version", max_len=64),
            sequence=root.integer("sequence", minimum=0),
            created=root.time("created"),
            expires=root.opt(root.time, "expires"),
            compatibility=_parse_compat(root.obj("compatibility")),
            model=_parse_model(root.obj("model")),
            quantization=_parse_quant(root.obj("quantization")),
            health=_parse_health(root.obj("health")),
            drift_reference=_parse_drift(root.opt(root.obj, "drift_reference")),
            evaluation=root.opt(root.any_obj, "evaluation"),
            model_card=_parse_card(root.obj("model_card")),
            files=_parse_files(root.array("files")),
            encryption=_parse_encryption(root.opt(root.obj, "encryption")),
            extensions={k: v for k, v in cast(dict[str, Any], doc).items() if k not in root.seen},
        )
        root.done()
        _check_consistency(manifest)
        return manifest


# --- parsing helpers -------------------------------------------------------------------

T = TypeVar("T")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a manifest")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


class _Obj:
    """Typed access to one JSON object, remembering which keys were read."""

    def __init__(self, value: object, where: str, *, strict: bool) -> None:
        if not isinstance(value, dict):
            raise MalformedManifestError(f"{where} must be an object")
        self.value: dict[str, Any] = value
        self.where = where
        self.strict = strict
        self.seen: set[str] = set()

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        if key not in self.value:
            raise MalformedManifestError(f"{self.where}.{key} is missing")
        return self.value[key]

    def _bad(self, key: str, what: str) -> MalformedManifestError:
        return MalformedManifestError(f"{self.where}.{key} must be {what}")

    def has(self, key: str) -> bool:
        return key in self.value

    def opt(self, getter: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        """``getter(key)`` unless the key is absent or null."""
        self.seen.add(key)
        if self.value.get(key) is None:
            return None
        return getter(key, *args, **kwargs)

    def text(self, key: str, *, max_len: int = 4096) -> str:
        v = self._get(key)
        if not isinstance(v, str) or len(v) > max_len:
            raise self._bad(key, f"a string of at most {max_len} characters")
        return v

    def name(self, key: str) -> str:
        v = self.text(key)
        if not _NAME_RE.match(v):
            raise self._bad(key, "1-128 characters of A-Z a-z 0-9 . _ - starting alphanumeric")
        return v

    def integer(self, key: str, *, minimum: int | None = None) -> int:
        v = self._get(key)
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            raise self._bad(key, "an integer" + (f" >= {minimum}" if minimum is not None else ""))
        return v

    def number(self, key: str, *, minimum: float | None = None) -> float:
        v = self._get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self._bad(key, "a finite number")
        if minimum is not None and v < minimum:
            raise self._bad(key, f"a number >= {minimum}")
        return float(v)

    def time(self, key: str) -> datetime:
        v = self.text(key, max_len=32)
        try:
            t = datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            raise self._bad(key, "a UTC time like 2026-01-31T12:00:00Z") from None
        return t.replace(tzinfo=UTC)

    def sha256(self, key: str) -> str:
        v = self.text(key)
        if not _SHA256_RE.match(v):
            raise self._bad(key, "64 lowercase hex digits")
        return v

    def path(self, key: str) -> str:
        v = self.text(key)
        if not is_safe_member_path(v):
            raise self._bad(key, "a safe relative member path")
        return v

    def array(self, key: str, *, max_len: int = 10_000) -> list[Any]:
        v = self._get(key)
        if not isinstance(v, list) or len(v) > max_len:
            raise self._bad(key, f"a list of at most {max_len} items")
        return v

    def texts(self, key: str) -> tuple[str, ...]:
        items = self.array(key, max_len=256)
        if not all(isinstance(i, str) and len(i) <= 4096 for i in items):
            raise self._bad(key, "a list of strings")
        return tuple(items)

    def numbers(self, key: str, *, max_len: int = 256) -> tuple[float, ...]:
        items = self.array(key, max_len=max_len)
        if not all(
            isinstance(i, int | float) and not isinstance(i, bool) and math.isfinite(i)
            for i in items
        ):
            raise self._bad(key, "a list of finite numbers")
        return tuple(float(i) for i in items)

    def obj(self, key: str) -> _Obj:
        return _Obj(self._get(key), f"{self.where}.{key}", strict=self.strict)

    def any_obj(self, key: str) -> dict[str, Any]:
        v = self._get(key)
        if not isinstance(v, dict):
            raise self._bad(key, "an object")
        return v

    def done(self) -> None:
        """In strict mode, any key not read is an error."""
        extra = sorted(set(self.value) - self.seen)
        if extra and self.strict:
            raise MalformedManifestError(
                f"{self.where} has unknown field(s) {', '.join(extra)}; this schema version"
                " does not define them"
            )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _parse_encryption(o: _Obj | None) -> Encryption | None:
    if o is None:
        return None
    scheme = o.text("scheme", max_len=64)
    if scheme != ENCRYPTION_SCHEME:
        raise MalformedManifestError(
            f"{o.where}.scheme {scheme!r} is unknown; this agent decrypts {ENCRYPTION_SCHEME}"
        )

    def raw(item: _Obj, key: str, size: int) -> bytes:
        text = item.text(key, max_len=128)
        try:
            data = base64.b64decode(text, validate=True)
        except ValueError:
            data = b""
        if len(data) != size or _b64(data) != text:
            raise MalformedManifestError(
                f"{item.where}.{key} must be {size} bytes in canonical base64"
            )
        return data

    recipients = []
    for r in _items(o, "recipients", max_len=1024):
        recipients.append(
            Recipient(r.sha256("key_id"), raw(r, "ephemeral_public", 32), raw(r, "wrapped_key", 48))
        )
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


def _items(parent: _Obj, key: str, *, max_len: int = 10_000) -> list[_Obj]:
    return [
        _Obj(item, f"{parent.where}.{key}[{i}]", strict=parent.strict)
        for i, item in enumerate(parent.array(key, max_len=max_len))
    ]


def _parse_tensor(o: _Obj) -> TensorSpec:
    dtype = o.text("dtype")
    if dtype not in DTYPES:
        raise MalformedManifestError(f"{o.where}.dtype {dtype!r} is not one of {sorted(DTYPES)}")
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


def _tensor_to_json(t: TensorSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
    out["quantization"] = (
        {"scale": t.quantization.scale, "zero_point": t.quantization.zero_point}
        if t.quantization
        else None
    )
    return out


def _parse_model(o: _Obj) -> ModelSpec:
    fmt = o.text("format")
    if fmt not in FORMAT_RUNTIMES:
        raise MalformedManifestError(f"{o.where}.format must be one of {sorted(FORMAT_RUNTIMES)}")
    spec = ModelSpec(
        format=cast(Literal["onnx", "tflite"], fmt),
        file=o.path("file"),
        inputs=tuple(_parse_tensor(t) for t in _items(o, "inputs", max_len=64)),
        outputs=tuple(_parse_tensor(t) for t in _items(o, "outputs", max_len=64)),
    )
    o.done()
    if not spec.inputs or not spec.outputs:
        raise MalformedManifestError(f"{o.where} needs at least one input and one output")
    return spec


def _parse_version(o: _Obj, key: str) -> str | None:
    v: str | None = o.opt(o.text, key, max_len=32)
    if v is not None and not _VERSION_RE.match(v):
        raise MalformedManifestError(f"{o.where}.{key} must look like 1.17 or 2.14.0")
    return v


def _parse_compat(o: _Obj) -> Compatibility:
    runtimes = []
    for r in _items(o, "runtimes", max_len=8):
        name = r.text("name")
        if name not in RUNTIMES:
            raise MalformedManifestError(f"{r.where}.name must be one of {list(RUNTIMES)}")
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


def _parse_quant(o: _Obj) -> Quantization:
    scheme = o.text("scheme")
    if scheme not in QUANT_SCHEMES:
        raise MalformedManifestError(f"{o.where}.scheme must be one of {sorted(QUANT_SCHEMES)}")
    q = Quantization(
        scheme=scheme,
        calibration_sha256=o.opt(o.sha256, "calibration_sha256"),
        details=o.any_obj("details"),
    )
    o.done()
    return q


def _parse_health(o: _Obj) -> Health:
    tol = o.obj("tolerance")
    tolerance = Tolerance(
        atol=tol.number("atol", minimum=0.0), rtol=tol.number("rtol", minimum=0.0)
    )
    tol.done()
    p = o.obj("probation")
    probation = Probation(
        requests=p.integer("requests", minimum=0),
        seconds=p.number("seconds", minimum=0.0),
        max_error_rate=p.number("max_error_rate", minimum=0.0),
        max_p95_ms=p.opt(p.number, "max_p95_ms", minimum=0.0),
    )
    p.done()
    health = Health(
        golden_inputs=o.path("golden_inputs"),
        expected_outputs=o.path("expected_outputs"),
        tolerance=tolerance,
        latency_budget_p95_ms=o.opt(o.number, "latency_budget_p95_ms", minimum=0.0),
        probation=probation,
    )
    o.done()
    return health


def _parse_drift(o: _Obj | None) -> DriftReference | None:
    if o is None:
        return None
    groups_obj = o.any_obj("groups")
    groups: dict[str, int] = {}
    for name, count in groups_obj.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise MalformedManifestError(f"{o.where}.groups.{name} must be a positive integer")
        groups[name] = count
    features = []
    for f in _items(o, "features", max_len=4096):
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


def _drift_to_json(d: DriftReference | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "sample_count": d.sample_count,
        "groups": dict(d.groups),
        "features": [
            {
                "input": f.input,
                "index": f.index,
                "edges": list(f.edges),
                "fractions": list(f.fractions),
                "mean": f.mean,
                "std": f.std,
            }
            for f in d.features
        ],
    }


def _parse_card(o: _Obj) -> ModelCard:
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
        o = _Obj(item, f"manifest.files[{i}]", strict=True)
        entries.append(
            FileEntry(
                path=o.path("path"), size=o.integer("size", minimum=0), sha256=o.sha256("sha256")
            )
        )
        o.done()
    paths = [e.path for e in entries]
    if paths != sorted(paths) or len(set(paths)) != len(paths):
        raise MalformedManifestError("manifest.files must be sorted by path without duplicates")
    return tuple(entries)


def _check_consistency(m: Manifest) -> None:
    listed = {f.path for f in m.files}
    for role, path in (
        ("model.file", m.model.file),
        ("health.golden_inputs", m.health.golden_inputs),
        ("health.expected_outputs", m.health.expected_outputs),
    ):
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
