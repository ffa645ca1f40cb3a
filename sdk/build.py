"""Build a signed bundle from a model: read its signature, compute golden outputs, sign, pack.

The library API behind ``edgeship build``. Everything the bundle holds is computed here
with the real runtime the bundle targets, through the agent's own runtime layer, so the
expected outputs are exactly what a healthy device computes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.bundle import write_bundle
from agent.errors import ConfigError
from agent.manifest import (
    FORMAT_RUNTIMES,
    PAYLOAD_TYPE,
    RUNTIMES,
    Compatibility,
    DriftReference,
    FileEntry,
    Health,
    Manifest,
    ModelCard,
    ModelSpec,
    Probation,
    Quantization,
    RuntimeRequirement,
    TensorSpec,
    Tolerance,
)
from sdk._npz import write_npz
from sdk.datasets import Dataset, load_dataset
from sdk.keys import SigningKey, sign_envelope
from sdk.model_io import read_signature

__all__ = [
    "BuildMetadata",
    "BuildResult",
    "Progress",
    "build_bundle",
    "creation_time",
    "load_metadata",
    "parse_target",
]

Progress = Callable[[str, int, int], None]
Arrays = dict[str, npt.NDArray[Any]]

GOLDEN_INPUTS = "health/golden_inputs.npz"
EXPECTED_OUTPUTS = "health/expected_outputs.npz"
_TARGET_RE = re.compile(
    r"^(?P<name>[a-z-]+)(?:\s*>=\s*(?P<min>[\d.]+))?(?:\s*,?\s*<\s*(?P<max>[\d.]+))?$"
)


@dataclass(frozen=True)
class BuildMetadata:
    """What a person says about the bundle (from a TOML file and/or CLI options)."""

    name: str
    version: str
    sequence: int
    expires_in_days: float | None = None
    model_card: ModelCard = field(default_factory=ModelCard)
    arch: tuple[str, ...] = ()
    device_classes: tuple[str, ...] = ()
    atol: float = 1e-4
    rtol: float = 1e-3
    latency_budget_p95_ms: float | None = None
    probation: Probation = field(default_factory=Probation)


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    digest: str  # sha256 of the signed manifest: the bundle's identity
    size: int


def parse_target(text: str) -> RuntimeRequirement:
    """``onnxruntime``, ``litert>=2.0`` or ``tflite-runtime>=2.14,<2.15``.

    Raises:
        ConfigError: unknown runtime or malformed version range.
    """
    m = _TARGET_RE.match(text.strip())
    if not m or m.group("name") not in RUNTIMES:
        raise ConfigError(
            f"target {text!r} is not RUNTIME[>=MIN][,<MAX]; RUNTIME is one of {', '.join(RUNTIMES)}"
        )
    return RuntimeRequirement(m.group("name"), m.group("min"), m.group("max"))


def load_metadata(path: Path | None, overrides: Mapping[str, Any]) -> BuildMetadata:
    """Metadata from a small TOML file, with CLI options taking precedence.

    Raises:
        ConfigError: the file is unreadable or a field has the wrong type.
    """
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read metadata file {path}: {exc}") from None
    for key, value in overrides.items():
        if value is not None:
            doc[key] = value
    card = doc.pop("model_card", {})
    health = doc.pop("health", {})
    probation = health.pop("probation", {}) if isinstance(health, dict) else {}
    compat = doc.pop("compatibility", {})
    try:
        meta = BuildMetadata(
            name=_req(doc, "name", str),
            version=_req(doc, "version", str),
            sequence=_req(doc, "sequence", int),
            expires_in_days=_opt(doc, "expires_in_days", float),
            model_card=ModelCard(
                description=_opt(card, "description", str) or "",
                intended_use=_opt(card, "intended_use", str) or "",
                data_sources=tuple(_opt(card, "data_sources", list) or ()),
                limitations=_opt(card, "limitations", str) or "",
                retraining_triggers=tuple(_opt(card, "retraining_triggers", list) or ()),
                owners=tuple(_opt(card, "owners", list) or ()),
                license=_opt(card, "license", str) or "",
            ),
            arch=tuple(_opt(compat, "arch", list) or ()),
            device_classes=tuple(_opt(compat, "device_classes", list) or ()),
            atol=_opt(health, "atol", float, BuildMetadata.atol),
            rtol=_opt(health, "rtol", float, BuildMetadata.rtol),
            latency_budget_p95_ms=_opt(health, "latency_budget_p95_ms", float),
            probation=Probation(
                requests=_opt(probation, "requests", int, Probation.requests),
                seconds=_opt(probation, "seconds", float, Probation.seconds),
                max_error_rate=_opt(probation, "max_error_rate", float, Probation.max_error_rate),
                max_p95_ms=_opt(probation, "max_p95_ms", float),
            ),
        )
    except (TypeError, AttributeError) as exc:
        raise ConfigError(f"metadata: {exc}") from None
    leftover = sorted(set(doc) - set(BuildMetadata.__dataclass_fields__))
    if leftover:
        raise ConfigError(f"metadata has unknown field(s): {', '.join(leftover)}")
    return meta


def _req(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in doc:
        raise ConfigError(f"metadata needs {key!r} (in the TOML file or as --{key})")
    return _opt(doc, key, kind)


def _opt(doc: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = doc.get(key)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"metadata {key!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


def creation_time() -> datetime:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else now; whole seconds, UTC.

    Raises:
        ConfigError: SOURCE_DATE_EPOCH is not an integer.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        return datetime.fromtimestamp(int(epoch), UTC)
    except ValueError:
        raise ConfigError(f"SOURCE_DATE_EPOCH={epoch!r} is not a whole number of seconds") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024**2):
            digest.update(chunk)
    return digest.hexdigest()


def _concrete_shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    return tuple(batch if i == 0 and d is None else (d or 1) for i, d in enumerate(spec.shape))


def synthesize_inputs(inputs: Sequence[TensorSpec], count: int, seed: int = 0) -> Arrays:
    """Deterministic pseudo-random inputs matching the signature (when none are given)."""
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for spec in inputs:
        shape = _concrete_shape(spec, count)
        if spec.dtype.startswith("float") or spec.quantization is not None:
            out[spec.name] = rng.standard_normal(shape).astype(np.float32)
        elif spec.dtype == "bool":
            out[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            info = np.iinfo(np.dtype(spec.dtype))
            out[spec.name] = rng.integers(max(info.min, -100), min(info.max, 100), shape).astype(
                spec.dtype
            )
    return out


def pick_golden(dataset: Dataset, count: int) -> Arrays:
    """``count`` samples spread evenly over the data set (first and last included)."""
    n = len(dataset)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    return {k: np.asarray(v)[idx] for k, v in dataset.inputs.items()}


def build_bundle(
    model_path: Path,
    out_path: Path,
    *,
    metadata: BuildMetadata,
    keys: Sequence[SigningKey],
    targets: Sequence[RuntimeRequirement] = (),
    golden_inputs: Path | None = None,  # .npy / .npz / folder, see sdk.datasets
    golden_count: int = 8,
    quantization: Quantization | None = None,
    io_quantization: Mapping[str, TensorSpec] | None = None,
    drift_reference: DriftReference | None = None,
    evaluation: Mapping[str, Any] | None = None,
    tolerance: Tolerance | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Build, sign and write a bundle; the file appears only when everything succeeded.

    Raises:
        ConfigError: bad model, inputs, metadata or targets.
        KeyFileError: no signing key.
        RuntimeUnavailableError: the target runtime is not installed on this machine.
    """
    from agent.runtimes import installed_runtimes, load_model  # noqa: PLC0415 - heavy import

    if not keys:
        raise ConfigError("a bundle needs at least one signing key (--key)")
    report = progress or (lambda step, done, total: None)
    fmt, inputs, outputs = read_signature(model_path)
    if io_quantization:
        inputs = tuple(io_quantization.get(s.name, s) for s in inputs)
        outputs = tuple(io_quantization.get(s.name, s) for s in outputs)
    runtimes = tuple(targets) or tuple(RuntimeRequirement(r) for r in FORMAT_RUNTIMES[fmt])
    for r in runtimes:
        if r.name not in FORMAT_RUNTIMES[fmt]:
            raise ConfigError(f"target {r.name} cannot run a {fmt} model")
    installed = installed_runtimes()
    runner = next((r.name for r in runtimes if r.name in installed), None)
    if runner is None:
        raise ConfigError(
            f"none of the targets ({', '.join(r.name for r in runtimes)}) is installed here to"
            " compute the golden outputs; install edgeship[sdk]"
        )
    created = creation_time()
    model_member = f"model/model.{fmt}"

    with tempfile.TemporaryDirectory(prefix="edgeship-build-") as tmp:
        stage = Path(tmp)
        (stage / "model").mkdir()
        (stage / "health").mkdir()
        shutil.copyfile(model_path, stage / model_member)

        spec = ModelSpec(format=fmt, file=model_member, inputs=inputs, outputs=outputs)
        manifest = Manifest(
            name=metadata.name,
            version=metadata.version,
            sequence=metadata.sequence,
            created=created,
            expires=(
                created + timedelta(days=metadata.expires_in_days)
                if metadata.expires_in_days
                else None
            ),
            compatibility=Compatibility(
                runtimes=runtimes, arch=metadata.arch, device_classes=metadata.device_classes
            ),
            model=spec,
            quantization=quantization or Quantization(),
            health=Health(
                golden_inputs=GOLDEN_INPUTS,
                expected_outputs=EXPECTED_OUTPUTS,
                tolerance=tolerance or Tolerance(atol=metadata.atol, rtol=metadata.rtol),
                latency_budget_p95_ms=metadata.latency_budget_p95_ms,
                probation=metadata.probation,
            ),
            drift_reference=drift_reference,
            evaluation=evaluation,
            model_card=metadata.model_card,
            files=(),
        )

        report("golden outputs", 0, 2)
        golden = (
            pick_golden(
                load_dataset(golden_inputs, input_names=[s.name for s in inputs]), golden_count
            )
            if golden_inputs is not None
            else synthesize_inputs(inputs, golden_count)
        )
        model = load_model(manifest, stage, runner)
        try:
            expected = model.predict(golden)
        finally:
            model.close()
        write_npz(stage / GOLDEN_INPUTS, golden)
        write_npz(stage / EXPECTED_OUTPUTS, expected)
        report("golden outputs", 2, 2)

        payload = {p: stage / p for p in (model_member, GOLDEN_INPUTS, EXPECTED_OUTPUTS)}
        files = tuple(
            FileEntry(path=p, size=src.stat().st_size, sha256=_sha256(src))
            for p, src in sorted(payload.items())
        )
        manifest = replace(manifest, files=files)
        manifest_bytes = manifest.to_bytes()
        Manifest.from_bytes(manifest_bytes)  # never sign what a device would refuse to parse
        report("sign", 0, 1)
        envelope = sign_envelope(PAYLOAD_TYPE, manifest_bytes, list(keys))
        report("sign", 1, 1)

        out_path.parent.mkdir(parents=True, exist_ok=True)
        partial = out_path.with_name(f".{out_path.name}.partial")
        with partial.open("wb") as f:
            write_bundle(f, manifest_bytes, envelope.to_bytes(), payload)
            f.flush()
            os.fsync(f.fileno())
        partial.replace(out_path)
    return BuildResult(
        path=out_path,
        manifest=manifest,
        digest=hashlib.sha256(manifest_bytes).hexdigest(),
        size=out_path.stat().st_size,
    )
