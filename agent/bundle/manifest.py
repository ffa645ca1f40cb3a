"""The bundle manifest: schema v1, strict parsing, canonical bytes.

The manifest is the signed statement of what a bundle is. :meth:`Manifest.from_bytes`
accepts only well-formed UTF-8 JSON that follows the schema exactly; a manifest written
for a newer *minor* schema may carry fields this version does not know, which are kept in
:attr:`Manifest.extensions` (and nested unknown fields ignored); a newer *major* schema is
refused with :class:`~agent.errors.SchemaVersionError`. A manifest of an older minor is
held to that minor: it may not carry fields added since (1.1 added ``model.scores_output``,
1.2 ``model.request_elements`` and ``health.cases``, 1.3 ``health.provider_tolerances``),
and it is written back without them, so its canonical bytes do not change.

See docs/bundle-format.md for the normative description.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal

from agent.bundle._manifest_write import drift_json, encryption_json, health_json, tensor_json
from agent.errors import MalformedManifestError
from agent.plumbing.strict import load_json

__all__ = [
    "DTYPES",
    "FORMAT_RUNTIMES",
    "MANIFEST_PATH",
    "MAX_GOLDEN_CASES",
    "PAYLOAD_TYPE",
    "RUNTIMES",
    "SCHEMA_VERSION",
    "SIGNATURE_PATH",
    "Compatibility",
    "DriftFeatureRef",
    "DriftReference",
    "FileEntry",
    "GoldenCases",
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
    "is_provider_name",
    "is_safe_member_path",
    "scores_output",
]

SCHEMA_MAJOR = 1
# 1.1 added model.scores_output; 1.2 model.request_elements and health.cases; 1.3
# health.provider_tolerances.
SCHEMA_MINOR = 3
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
# Golden cases a manifest may list (health.cases.count): the health gate replays each.
MAX_GOLDEN_CASES = 1024
SCHEMA_VERSION_RE = re.compile(r"([0-9]+)\.([0-9]+)")
# The first minor whose manifests carry model.scores_output (absent before: a strict
# reader of an older minor refuses it as unknown).
SCORES_OUTPUT_SINCE_MINOR = 1
# The first minor with golden cases (health.cases) and model.request_elements.
CASES_SINCE_MINOR = 2
# The first minor with tolerances per execution provider (health.provider_tolerances).
PROVIDER_TOLERANCES_SINCE_MINOR = 3
# Providers a manifest may give tolerances for: a device lists a few, best first.
MAX_PROVIDER_TOLERANCES = 16
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

# Grammars of the manifest's string fields, always matched in full (re.fullmatch): a
# pattern anchored with "$" would let a trailing newline through.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_WHAT = "1-128 characters of A-Z a-z 0-9 . _ - starting alphanumeric"
# A human version: printable ASCII without spaces ("1.0.0", "2026.11-rc1+build.7").
HUMAN_VERSION_RE = re.compile(r"[!-~]{1,64}")
HUMAN_VERSION_WHAT = "1-64 printable ASCII characters without spaces"
SHA256_RE = re.compile(r"[0-9a-f]{64}")
VERSION_RE = re.compile(r"[0-9]+(\.[0-9]+)*")  # [0-9], not \d: no other scripts' digits
_PATH_COMPONENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
MAX_MEMBER_PATH_BYTES = 100  # fits a plain ustar name field: no pax or GNU extensions
# Execution providers and delegates as a device's agent.toml names them (runtime.providers,
# runtime.delegates): onnxruntime's provider names; xnnpack, cpu or a delegate library's
# absolute path (printable ASCII without spaces).
_EXECUTION_PROVIDER_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}ExecutionProvider")
_DELEGATE_LIBRARY_RE = re.compile(r"/[!-~]{1,255}")


def is_safe_member_path(path: str) -> bool:
    """True for a relative POSIX path of plain components, short enough for ustar."""
    if not path or len(path.encode("utf-8")) > MAX_MEMBER_PATH_BYTES:
        return False
    if path in (MANIFEST_PATH, SIGNATURE_PATH):
        return False
    return all(_PATH_COMPONENT_RE.fullmatch(part) for part in path.split("/"))


def is_provider_name(name: str, model_format: str) -> bool:
    """True for a name a device may serve a ``model_format`` model on: an onnxruntime
    execution provider for ONNX; ``xnnpack``, ``cpu`` or a delegate library's absolute
    path for TFLite."""
    if model_format == "onnx":
        return _EXECUTION_PROVIDER_RE.fullmatch(name) is not None
    return name in ("xnnpack", "cpu") or _DELEGATE_LIBRARY_RE.fullmatch(name) is not None


def _schema_minor(version: str) -> int | None:
    """The minor number of a ``MAJOR.MINOR`` schema version; None if it is not one."""
    m = SCHEMA_VERSION_RE.fullmatch(version)
    return int(m.group(2)) if m else None


def format_time(t: datetime) -> str:
    """RFC 3339 UTC with a trailing ``Z`` and whole seconds: the manifest's time format."""
    return t.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _is_scores(t: TensorSpec) -> bool:
    # Callers receive quantized outputs as floats, so those count as float here.
    return (
        (t.dtype.startswith("float") or t.quantization is not None)
        and len(t.shape) == 2
        and isinstance(t.shape[1], int)
        and t.shape[1] >= 2
    )


def scores_output(outputs: Sequence[TensorSpec]) -> TensorSpec | None:
    """The first output shaped like class scores: floats (as callers receive them) of
    shape ``(batch, k)`` with a fixed ``k >= 2``; None if there is none.

    The one definition of "the classifier's scores": the SDK applies it to a model's
    actual outputs (evaluation, ``model.scores_output``), the agent to a manifest without
    that field. Not simply the first output: a converter may put the predicted label
    first (skl2onnx writes ``label``, then ``probabilities``).
    """
    return next((t for t in outputs if _is_scores(t)), None)


@dataclass(frozen=True)
class ModelSpec:
    format: Literal["onnx", "tflite"]
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # The output carrying class scores, by name (schema 1.1); None: none does, or the
    # manifest predates the field.
    scores_output: str | None = None
    # Input elements of one real request (golden case 0; schema 1.2), for the agent's
    # thread choice where the inputs have dynamic dimensions; None: unknown.
    request_elements: int | None = None


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
class GoldenCases:
    """Golden cases (schema 1.2): each case is one request, replayed as that request.

    ``inputs`` and ``expected`` are payload paths of ``.npz`` files keyed
    ``"<case>/<name>"`` (case ``0`` to ``count - 1``, split at the first ``/``), holding
    each case's inputs exactly as sent (any layout, scalars, state tensors) and the outputs
    expected back. ``tolerances`` gives an output its own tolerance; an output it does not
    name uses ``health.tolerance``.
    """

    count: int
    inputs: str
    expected: str
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)

    def tolerance(self, output: str, default: Tolerance) -> Tolerance:
        return self.tolerances.get(output, default)


@dataclass(frozen=True)
class Health:
    """The health gate's evidence: golden requests, expected outputs and tolerances.

    ``provider_tolerances`` (schema 1.3) maps an execution provider or delegate (as a
    device's ``runtime.providers`` / ``runtime.delegates`` names it) to output name ->
    tolerance, measured by the build on that provider: on it, an output it names uses
    that tolerance instead of the case's one (:meth:`tolerances_on`).
    """

    # Before 1.2 the golden request; from 1.2 on golden case 0, for agents before 1.2.
    golden_inputs: str  # payload path of an .npz keyed by input name
    expected_outputs: str  # payload path of an .npz keyed by output name
    tolerance: Tolerance
    latency_budget_p95_ms: float | None = None
    probation: Probation = field(default_factory=Probation)
    cases: GoldenCases | None = None  # schema 1.2; None: the golden request alone
    provider_tolerances: Mapping[str, Mapping[str, Tolerance]] = field(default_factory=dict)

    def tolerances_on(self, provider: str | None) -> dict[str, Tolerance]:
        """Output name -> tolerance on ``provider`` (None: unknown); an output not named
        uses :attr:`tolerance`."""
        out = dict(self.cases.tolerances) if self.cases is not None else {}
        if provider is not None:
            out.update(self.provider_tolerances.get(provider, {}))
        return out


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
                "model": self._model_json(),
                "quantization": {
                    "scheme": self.quantization.scheme,
                    "calibration_sha256": self.quantization.calibration_sha256,
                    "details": dict(self.quantization.details),
                },
                "health": self._health_json(),
                "drift_reference": drift_json(self.drift_reference),
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
            out["encryption"] = encryption_json(self.encryption)
        return out

    def _model_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.model.format,
            "file": self.model.file,
            "inputs": [tensor_json(t) for t in self.model.inputs],
            "outputs": [tensor_json(t) for t in self.model.outputs],
        }
        # Left out of older minors, whose canonical bytes must not change; written when
        # set even there, so that such a manifest is refused before it is signed.
        if self._has(SCORES_OUTPUT_SINCE_MINOR, self.model.scores_output):
            out["scores_output"] = self.model.scores_output
        if self._has(CASES_SINCE_MINOR, self.model.request_elements):
            out["request_elements"] = self.model.request_elements
        return out

    def _has(self, since_minor: int, value: object) -> bool:
        """Whether a field added in ``since_minor`` is written (see :meth:`_model_json`)."""
        minor = _schema_minor(self.schema_version)
        return minor is None or minor >= since_minor or value is not None

    def _health_json(self) -> dict[str, Any]:
        h = self.health
        return health_json(
            h,
            cases=self._has(CASES_SINCE_MINOR, h.cases),
            provider_tolerances=self._has(
                PROVIDER_TOLERANCES_SINCE_MINOR, h.provider_tolerances or None
            ),
        )

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
        return cls.from_json(load_json(data, what="manifest", error=MalformedManifestError))

    @classmethod
    def from_json(cls, doc: object) -> Manifest:
        """Check a decoded JSON document against schema v1. Raises: as :meth:`from_bytes`."""
        from agent.bundle._manifest_read import read_manifest  # noqa: PLC0415 - a cycle

        return read_manifest(doc)
