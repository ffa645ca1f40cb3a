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
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.bundle._verify import write_bundle
from agent.errors import ConfigError, GateError
from agent.bundle.manifest import (
    FORMAT_RUNTIMES,
    PAYLOAD_TYPE,
    RUNTIMES,
    Compatibility,
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
from agent.bundle.crypto import encrypt_files
from agent.bundle.arrays import write_npz
from sdk.build.datasets import Dataset, load_dataset
from sdk.build.drift_reference import drift_reference
from sdk.build.evaluate import Gates, derive_golden, evaluate
from sdk.build.keys import SigningKey, sign_envelope
from sdk.build.model_io import read_signature
from sdk.build.quantize import Scheme
from sdk.build.quantize import quantize as run_quantizer

__all__ = [
    "BuildMetadata",
    "BuildResult",
    "Progress",
    "QuantizeOptions",
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
    # Fixed golden tolerance; None (the default) derives it from the measured spread.
    atol: float | None = None
    rtol: float | None = None
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
        if value is None:
            continue
        # "health.latency_budget_p95_ms" sets a key of a table.
        *tables, leaf = key.split(".")
        target = doc
        for table in tables:
            target = target.setdefault(table, {})
        target[leaf] = value
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


@dataclass(frozen=True)
class QuantizeOptions:
    """How to turn the float model into the bundled one, and how to prove it still works."""

    scheme: str = "none"  # none, dynamic, static, weight-only
    calibration: Path | None = None  # .npy / .npz / folder, see sdk.build.datasets
    validation: Path | None = None  # inputs (+ optional "labels") for evaluation and gates
    gates: Gates = field(default_factory=Gates)
    per_channel: bool | None = None  # None: chosen by measurement


def build_bundle(
    model_path: Path,
    out_path: Path,
    *,
    metadata: BuildMetadata,
    keys: Sequence[SigningKey],
    targets: Sequence[RuntimeRequirement] = (),
    golden_inputs: Path | None = None,
    golden_count: int = 8,
    quantize: QuantizeOptions | None = None,
    progress: Progress | None = None,
    encrypt_for: Sequence[X25519PublicKey] = (),
) -> BuildResult:
    """Quantize, evaluate, compute golden outputs, sign and write a bundle.

    The bundle file appears only when everything succeeded and every gate passed.

    Golden inputs come from ``golden_inputs``, else the validation set, else the
    calibration set, else are synthesised; the expected outputs are computed with the
    bundled model through the agent's own runtime layer, and the tolerance is derived
    from the measured spread (:func:`sdk.build.evaluate.derive_golden`) unless the metadata
    fixes ``atol`` / ``rtol``. The drift reference comes from the calibration set (else
    the validation set). With ``encrypt_for`` (device X25519 public keys), every payload
    file is encrypted for those devices (:mod:`agent.bundle.crypto`); the manifest stays
    readable and the signature and digests cover the ciphertext.

    Raises:
        ConfigError: bad model, data sets, metadata or targets.
        QuantizationError: the quantizer failed.
        GateError: the candidate missed a gate (``exc.report`` shows which and by how much).
        KeyFileError: no usable signing key.
        RuntimeUnavailableError: no target runtime is installed here.
    """
    from agent.serve.runtimes import installed_runtimes, load_model  # noqa: PLC0415 - heavy import

    if not keys:
        raise ConfigError("a bundle needs at least one signing key (--key)")
    options = quantize or QuantizeOptions()
    report = progress or (lambda step, done, total: None)
    fmt, float_inputs, _ = read_signature(model_path)
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
    if any(v is not None for v in vars(options.gates).values()) and options.validation is None:
        raise ConfigError("build gates need a validation data set (--validation)")
    names = [s.name for s in float_inputs]
    calibration = (
        load_dataset(options.calibration, input_names=names) if options.calibration else None
    )
    validation = load_dataset(options.validation, input_names=names) if options.validation else None
    golden_dataset = load_dataset(golden_inputs, input_names=names) if golden_inputs else None
    drift_source = calibration if calibration is not None else validation
    created = creation_time()
    model_member = f"model/model.{fmt}"

    with tempfile.TemporaryDirectory(prefix="edgeship-build-") as tmp:
        stage = Path(tmp)
        (stage / "model").mkdir()
        (stage / "health").mkdir()
        bundled = stage / model_member
        if options.scheme == "none":
            shutil.copyfile(model_path, bundled)
            quant_info = Quantization()
        else:
            result = run_quantizer(
                model_path,
                stage / f"quantized.{fmt}",
                scheme=cast(Scheme, options.scheme),
                calibration=calibration,
                targets=[r.name for r in runtimes],
                per_channel=options.per_channel,
                progress=report,
            )
            shutil.copyfile(result.path, bundled)
            quant_info = result.to_manifest()
        _, inputs, outputs = read_signature(bundled)

        evaluation: dict[str, Any] = {}
        if validation is not None:
            ev = evaluate(model_path, bundled, validation, gates=options.gates, progress=report)
            evaluation = ev.to_json()
            if not ev.passed:
                failed = ", ".join(
                    f"{g.name} (measured {g.measured}, limit {g.limit} {g.unit})"
                    for g in ev.failed_gates
                )
                raise GateError(f"the candidate missed its gate(s): {failed}", report=ev)

        source = next((d for d in (golden_dataset, validation, calibration) if d is not None), None)
        golden_in = (
            pick_golden(source, golden_count)
            if source is not None
            else synthesize_inputs(float_inputs, golden_count)
        )
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
            model=ModelSpec(format=fmt, file=model_member, inputs=inputs, outputs=outputs),
            quantization=quant_info,
            health=Health(
                golden_inputs=GOLDEN_INPUTS,
                expected_outputs=EXPECTED_OUTPUTS,
                tolerance=Tolerance(atol=0.0),  # replaced below, once measured
                latency_budget_p95_ms=metadata.latency_budget_p95_ms,
                probation=metadata.probation,
            ),
            drift_reference=drift_reference(drift_source) if drift_source is not None else None,
            model_card=metadata.model_card,
            files=(),
        )

        report("golden outputs", 0, 2)
        model = load_model(manifest, stage, runner)
        try:
            expected = model.predict(golden_in)
        finally:
            model.close()
        golden = derive_golden(
            bundled,
            Dataset(golden_in),
            count=len(next(iter(golden_in.values()))),
            reference_outputs=expected,
        )
        report("golden outputs", 2, 2)
        tolerance = (
            Tolerance(atol=metadata.atol or 0.0, rtol=metadata.rtol or 0.0)
            if metadata.atol is not None or metadata.rtol is not None
            else golden.tolerance
        )
        evaluation["golden"] = {"spread": golden.spread, **dict(golden.details)}
        write_npz(stage / GOLDEN_INPUTS, golden_in)
        write_npz(stage / EXPECTED_OUTPUTS, expected)

        payload = {p: stage / p for p in (model_member, GOLDEN_INPUTS, EXPECTED_OUTPUTS)}
        encryption = None
        if encrypt_for:
            try:
                encryption, sealed = encrypt_files(
                    {p: src.read_bytes() for p, src in payload.items()}, list(encrypt_for)
                )
            except ValueError as exc:
                raise ConfigError(f"cannot encrypt the bundle: {exc}") from None
            for p, data in sealed.items():
                target = stage / "encrypted" / p
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                payload[p] = target
        files = tuple(
            FileEntry(path=p, size=src.stat().st_size, sha256=_sha256(src))
            for p, src in sorted(payload.items())
        )
        manifest = replace(
            manifest,
            files=files,
            health=replace(manifest.health, tolerance=tolerance),
            evaluation=evaluation,
            encryption=encryption,
        )
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
