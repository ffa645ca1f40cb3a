"""Build a signed bundle from a model, step by step: read the inputs and data sets,
quantize, evaluate and apply the gates, compute the golden outputs, write the manifest,
lay out (and encrypt) the payload, sign and write the bundle.

The library API behind ``edgeship build``. Everything the bundle holds is computed here
with the real runtime the bundle targets, through the agent's own runtime layer, so the
expected outputs are exactly what a healthy device computes.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.bundle import write_bundle
from agent.bundle.arrays import write_npz
from agent.bundle.crypto import encrypt_files
from agent.bundle.manifest import (
    FORMAT_RUNTIMES,
    PAYLOAD_TYPE,
    Compatibility,
    Encryption,
    FileEntry,
    Health,
    Manifest,
    ModelSpec,
    Quantization,
    RuntimeRequirement,
    TensorSpec,
    Tolerance,
)
from agent.errors import ConfigError
from agent.plumbing.files import atomic_replace
from agent.serve.runtimes import installed_runtimes
from sdk.build._evaluate import Gates, evaluate, scores_index
from sdk.build._metadata import BuildMetadata, creation_time, load_metadata, parse_target
from sdk.build._quantize import Scheme
from sdk.build._quantize import quantize as run_quantizer
from sdk.build.datasets import Dataset, load_dataset
from sdk.build.drift_reference import drift_reference
from sdk.build.golden import derive_golden, pick_golden, synthesize_inputs
from sdk.build.keys import SigningKey, sign_envelope
from sdk.build.model_io import ModelFormat, model_spec, open_model, read_signature
from sdk.errors import GateError

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


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    digest: str  # sha256 of the signed manifest: the bundle's identity
    size: int


@dataclass(frozen=True)
class QuantizeOptions:
    """How to turn the float model into the bundled one, and how to prove it still works."""

    scheme: str = "none"  # none, dynamic, static, weight-only
    calibration: Path | None = None  # .npy / .npz / folder, see sdk.build.datasets
    validation: Path | None = None  # inputs (+ optional "labels") for evaluation and gates
    gates: Gates = field(default_factory=Gates)
    per_channel: bool | None = None  # None: chosen by measurement


@dataclass(frozen=True)
class _Inputs:
    """What the build reads before it writes anything."""

    format: ModelFormat
    float_inputs: tuple[TensorSpec, ...]  # the original model's inputs
    runtimes: tuple[RuntimeRequirement, ...]  # the bundle's targets
    runner: str  # the first target installed here: it computes the expected outputs
    calibration: Dataset | None
    validation: Dataset | None
    golden: Dataset | None


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
    from the measured spread (:func:`sdk.build.golden.derive_golden`) unless the metadata
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
    if not keys:
        raise ConfigError("a bundle needs at least one signing key (--key)")
    options = quantize or QuantizeOptions()
    report = progress or (lambda step, done, total: None)
    src = _read_inputs(model_path, targets, options, golden_inputs)
    created = creation_time()
    with tempfile.TemporaryDirectory(prefix="edgeship-build-") as tmp:
        stage = Path(tmp)
        bundled, quantization = _bundled_model(model_path, stage, src, options, report)
        evaluation = _evaluate(model_path, bundled, src.validation, options.gates, report)
        golden_in = _golden_inputs(src, golden_count)
        expected, tolerance, how = _golden(bundled, golden_in, src.runner, metadata, report)
        evaluation["golden"] = how
        spec = _model_section(bundled, stage, expected)
        payload, encryption = _payload(stage, spec.file, golden_in, expected, encrypt_for)
        manifest = _manifest(
            src,
            spec,
            metadata=metadata,
            created=created,
            quantization=quantization,
            tolerance=tolerance,
            evaluation=evaluation,
            payload=payload,
            encryption=encryption,
        )
        return _sign_and_write(manifest, payload, keys, out_path, report)


def _read_inputs(
    model_path: Path,
    targets: Sequence[RuntimeRequirement],
    options: QuantizeOptions,
    golden_inputs: Path | None,
) -> _Inputs:
    """The model's signature, the targets and the data sets, all checked.

    Raises:
        ConfigError: a target cannot run the model, none is installed here, gates without
            validation data, or a data set that does not fit the model.
    """
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

    def load(path: Path | None) -> Dataset | None:
        return None if path is None else load_dataset(path, input_names=names)

    return _Inputs(
        format=fmt,
        float_inputs=float_inputs,
        runtimes=runtimes,
        runner=runner,
        calibration=load(options.calibration),
        validation=load(options.validation),
        golden=load(golden_inputs),
    )


def _bundled_model(
    model_path: Path, stage: Path, src: _Inputs, options: QuantizeOptions, report: Progress
) -> tuple[Path, Quantization]:
    """The model file the bundle carries (``stage/model/model.FORMAT``) and how it was made.

    Raises:
        ConfigError, QuantizationError: as :func:`sdk.build.quantize`.
    """
    bundled = stage / "model" / f"model.{src.format}"
    bundled.parent.mkdir()
    if options.scheme == "none":
        shutil.copyfile(model_path, bundled)
        return bundled, Quantization()
    result = run_quantizer(
        model_path,
        stage / f"quantized.{src.format}",
        scheme=cast(Scheme, options.scheme),
        calibration=src.calibration,
        targets=[r.name for r in src.runtimes],
        per_channel=options.per_channel,
        progress=report,
    )
    shutil.copyfile(result.path, bundled)
    return bundled, result.to_manifest()


def _evaluate(
    model_path: Path, bundled: Path, validation: Dataset | None, gates: Gates, report: Progress
) -> dict[str, Any]:
    """The evaluation report for the manifest (empty without validation data).

    Raises:
        GateError: the bundled model missed a gate; nothing is written.
    """
    if validation is None:
        return {}
    ev = evaluate(model_path, bundled, validation, gates=gates, progress=report)
    if not ev.passed:
        failed = ", ".join(
            f"{g.name} (measured {g.measured}, limit {g.limit} {g.unit})" for g in ev.failed_gates
        )
        raise GateError(f"the candidate missed its gate(s): {failed}", report=ev)
    return ev.to_json()


def _golden_inputs(src: _Inputs, count: int) -> Arrays:
    source = next((d for d in (src.golden, src.validation, src.calibration) if d is not None), None)
    if source is None:
        return synthesize_inputs(src.float_inputs, count)
    return pick_golden(source, count)


def _golden(
    bundled: Path, golden_in: Arrays, runner: str, metadata: BuildMetadata, report: Progress
) -> tuple[Arrays, Tolerance, dict[str, Any]]:
    """The expected outputs as a device computes them (one batch, the agent's defaults),
    the health check's tolerance, and how it was derived.
    """
    report("golden outputs", 0, 2)
    with open_model(bundled, runtime=runner, threads=0) as model:
        expected = model.predict(golden_in)
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
    return expected, tolerance, {"spread": golden.spread, **dict(golden.details)}


def _model_section(bundled: Path, stage: Path, expected: Arrays) -> ModelSpec:
    """The manifest's model section, naming the output that carries class scores (found on
    the outputs the bundled model computed for the golden inputs)."""
    spec = model_spec(bundled)
    scores = scores_index(spec.outputs, [expected[o.name] for o in spec.outputs])
    return replace(
        spec,
        file=bundled.relative_to(stage).as_posix(),
        scores_output=None if scores is None else spec.outputs[scores].name,
    )


def _payload(
    stage: Path,
    model_member: str,
    golden_in: Arrays,
    expected: Arrays,
    encrypt_for: Sequence[X25519PublicKey],
) -> tuple[dict[str, Path], Encryption | None]:
    """The payload files by member path, encrypted for ``encrypt_for`` when given.

    Raises:
        ConfigError: the files cannot be encrypted.
    """
    (stage / "health").mkdir()
    write_npz(stage / GOLDEN_INPUTS, golden_in)
    write_npz(stage / EXPECTED_OUTPUTS, expected)
    payload = {p: stage / p for p in (model_member, GOLDEN_INPUTS, EXPECTED_OUTPUTS)}
    if not encrypt_for:
        return payload, None
    try:
        encryption, sealed = encrypt_files(
            {p: path.read_bytes() for p, path in payload.items()}, list(encrypt_for)
        )
    except ValueError as exc:
        raise ConfigError(f"cannot encrypt the bundle: {exc}") from None
    for p, data in sealed.items():
        target = stage / "encrypted" / p
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        payload[p] = target
    return payload, encryption


def _manifest(
    src: _Inputs,
    spec: ModelSpec,
    *,
    metadata: BuildMetadata,
    created: datetime,
    quantization: Quantization,
    tolerance: Tolerance,
    evaluation: dict[str, Any],
    payload: Mapping[str, Path],
    encryption: Encryption | None,
) -> Manifest:
    drift_source = src.calibration if src.calibration is not None else src.validation
    return Manifest(
        name=metadata.name,
        version=metadata.version,
        sequence=metadata.sequence,
        created=created,
        expires=(
            created + timedelta(days=metadata.expires_in_days) if metadata.expires_in_days else None
        ),
        compatibility=Compatibility(
            runtimes=src.runtimes, arch=metadata.arch, device_classes=metadata.device_classes
        ),
        model=spec,
        quantization=quantization,
        health=Health(
            golden_inputs=GOLDEN_INPUTS,
            expected_outputs=EXPECTED_OUTPUTS,
            tolerance=tolerance,
            latency_budget_p95_ms=metadata.latency_budget_p95_ms,
            probation=metadata.probation,
        ),
        drift_reference=drift_reference(drift_source) if drift_source is not None else None,
        model_card=metadata.model_card,
        files=tuple(
            FileEntry(path=p, size=path.stat().st_size, sha256=_sha256(path))
            for p, path in sorted(payload.items())
        ),
        evaluation=evaluation,
        encryption=encryption,
    )


def _sign_and_write(
    manifest: Manifest,
    payload: Mapping[str, Path],
    keys: Sequence[SigningKey],
    out_path: Path,
    report: Progress,
) -> BuildResult:
    """Sign ``manifest`` and write the bundle atomically to ``out_path``.

    Raises:
        OSError: the bundle cannot be written.
    """
    manifest_bytes = manifest.to_bytes()
    Manifest.from_bytes(manifest_bytes)  # never sign what a device would refuse to parse
    report("sign", 0, 1)
    envelope = sign_envelope(PAYLOAD_TYPE, manifest_bytes, list(keys))
    report("sign", 1, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(out_path) as f:
        write_bundle(f, manifest_bytes, envelope.to_bytes(), payload)
    return BuildResult(
        path=out_path,
        manifest=manifest,
        digest=hashlib.sha256(manifest_bytes).hexdigest(),
        size=out_path.stat().st_size,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024**2):
            digest.update(chunk)
    return digest.hexdigest()
