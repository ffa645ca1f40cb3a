"""Build a signed bundle from a model, step by step: read the inputs and data sets,
quantize, evaluate and apply the gates, compute the golden outputs, write the manifest,
lay out (and encrypt) the payload, sign and write the bundle.

The library API behind ``edgeship build``. Everything the bundle holds is computed here
with the real runtime the bundle targets, through the agent's own runtime layer, so the
expected outputs are exactly what a healthy device computes.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.bundle import write_bundle
from agent.bundle.arrays import case_arrays, write_npz
from agent.bundle.crypto import encrypt_files
from agent.bundle.manifest import (
    FORMAT_RUNTIMES,
    MAX_GOLDEN_CASES,
    PAYLOAD_TYPE,
    Compatibility,
    Encryption,
    FileEntry,
    GoldenCases,
    Health,
    Manifest,
    ModelSpec,
    Quantization,
    RuntimeRequirement,
    TensorSpec,
    Tolerance,
)
from agent.errors import ConfigError, InferenceError
from agent.plumbing.files import atomic_replace, file_sha256
from agent.serve.runtimes import Model, installed_runtimes
from sdk.build._bundle_provenance import ProvenanceOptions, start_provenance
from sdk.build._bundle_quant import QuantizeOptions, bundled_model, cost_gates
from sdk.build._cases import (
    Case,
    cases_from_dataset,
    load_cases,
    request_elements,
    synthesize_cases,
)
from sdk.build._evaluate import Gates, evaluate, scores_index
from sdk.build._metadata import (
    BuildMetadata,
    check_metadata,
    creation_time,
    load_metadata,
    parse_target,
)
from sdk.build._provider_tolerances import check_providers, measure_providers
from sdk.build.datasets import Dataset, load_dataset
from sdk.build.drift_reference import drift_reference
from sdk.build.golden import Golden, derive_golden, run_cases
from sdk.build.keys import SigningKey, sign_envelope
from sdk.build.model_io import ModelFormat, model_spec, open_model, read_signature
from sdk.errors import BuildError, GateError

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
CASE_INPUTS = "health/case_inputs.npz"
CASE_EXPECTED = "health/case_expected.npz"
_REAL_INPUTS_FIX = (
    "pass real inputs with --golden-inputs (a cases .npz keyed <case>/<input>, see"
    " docs/building.md) or hints (--input-shape, --input-value, --input-range)"
)


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    digest: str  # sha256 of the signed manifest: the bundle's identity
    size: int


@dataclass(frozen=True)
class _Inputs:
    """What the build reads before it writes anything."""

    format: ModelFormat
    float_inputs: tuple[TensorSpec, ...]  # the original model's inputs
    runtimes: tuple[RuntimeRequirement, ...]  # the bundle's targets
    runner: str  # the first target installed here: it computes the expected outputs
    calibration: Dataset | None
    validation: Dataset | None
    cases: tuple[Case, ...]  # the golden requests, checked on the original model
    reference: tuple[Arrays, ...]  # the original model's outputs for them
    synthesized: bool  # the cases were made up from the signature and hints
    providers: tuple[str, ...]  # execution providers to measure golden tolerances on


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
    overwrite: bool = False,
    provenance: ProvenanceOptions | None = None,
) -> BuildResult:
    """Quantize, evaluate, compute golden outputs, sign and write a bundle: the file
    appears only when everything succeeded and every gate passed.

    Golden inputs come from ``golden_inputs``, else the validation set, else the
    calibration set, else are synthesised; expected outputs and tolerances come from the
    bundled model through the agent's own runtime layer (:mod:`sdk.build.golden`). With
    ``encrypt_for`` (device X25519 keys) every payload file is encrypted; the manifest
    stays readable. An existing ``out_path`` is replaced only with ``overwrite``. Every
    bundle carries its provenance (:mod:`sdk.build._bundle_provenance`: it checks the
    source model's OpenSSF signature first, when ``provenance`` names one).

    Raises:
        ConfigError, QuantizationError: bad inputs; the quantizer failed.
        GateError: the candidate missed a gate (``exc.report`` shows which and by how much).
        KeyFileError, RuntimeUnavailableError, ModelSignatureError: no usable key; no
            target runtime here; the source model's signature does not verify.
    """
    if not keys:
        raise ConfigError("a bundle needs at least one signing key (--key)")
    check_metadata(metadata)
    if out_path.exists() and not overwrite:
        raise ConfigError(f"{out_path} already exists; pass --force to replace it")
    options = quantize or QuantizeOptions()
    created = creation_time()
    record = start_provenance(
        model_path, provenance, options, golden_inputs, metadata, created, bool(encrypt_for)
    )
    report = progress or (lambda step, done, total: None)
    src = _read_inputs(
        model_path, targets, options, golden_inputs, golden_count=golden_count, metadata=metadata
    )
    with tempfile.TemporaryDirectory(prefix="edgeship-build-") as tmp:
        stage = Path(tmp)
        bundled, quantization = bundled_model(
            model_path,
            stage,
            src.format,
            options,
            calibration=src.calibration,
            targets=[r.name for r in src.runtimes],
            report=report,
            golden=(src.cases, src.reference, src.runner),
        )
        evaluation = _evaluate(model_path, bundled, src.validation, options.gates, report)
        if options.scheme != "none":
            evaluation["vs_fp32"] = cost_gates(
                model_path, bundled, src.cases[0], src.runner, options
            )
        golden = _golden(bundled, src, quantization.scheme != "none", report)
        health, evaluation["golden"] = _health(bundled, golden, src, metadata, report)
        spec = _model_section(bundled, stage, golden)
        add = partial(record.members, stage, spec.file, src.runtimes, quantization, evaluation)
        payload, encryption = _payload(stage, spec.file, golden, encrypt_for, add=add)
        manifest = _manifest(
            src,
            spec,
            metadata=metadata,
            created=created,
            quantization=quantization,
            health=health,
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
    *,
    golden_count: int,
    metadata: BuildMetadata,
) -> _Inputs:
    """The model's signature, the targets, the data sets and the golden cases, all checked
    (the cases run on the original model before anything is quantized).

    Raises:
        ConfigError: a target cannot run the model, none is installed here, gates without
            validation data, or a data set or golden case that does not fit the model.
        BuildError: the golden cases do not run on the original model.
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
    if not 1 <= golden_count <= MAX_GOLDEN_CASES:
        raise ConfigError(
            f"--golden-count must be 1 to {MAX_GOLDEN_CASES} (the cases a manifest may list),"
            f" not {golden_count}"
        )
    names = [s.name for s in float_inputs]

    def load(path: Path | None) -> Dataset | None:
        return None if path is None else load_dataset(path, input_names=names)

    calibration, validation = load(options.calibration), load(options.validation)
    source = validation if validation is not None else calibration
    if golden_inputs is not None:
        cases = load_cases(golden_inputs, float_inputs, golden_count)
    elif source is not None:
        cases = cases_from_dataset(source, golden_count)
    else:
        cases = synthesize_cases(float_inputs, golden_count, metadata.input_hints)
    with open_model(model_path, runtime=runner, threads=0) as original:
        reference = _replay(original, cases, model_path.name)
    return _Inputs(
        format=fmt,
        float_inputs=float_inputs,
        runtimes=runtimes,
        runner=runner,
        calibration=calibration,
        validation=validation,
        cases=tuple(cases),
        reference=tuple(reference),
        synthesized=golden_inputs is None and source is None,
        providers=check_providers(metadata.measure_providers, fmt, runner),
    )


def _replay(model: Model, cases: Sequence[Case], what: str) -> list[Arrays]:
    """``model``'s outputs for each case, a failing case named in a one-line error.

    Raises:
        BuildError: a case does not fit the model or the runtime fails on it.
    """
    out: list[Arrays] = []
    for n, case in enumerate(cases):
        try:
            out.append(dict(run_cases(model, [case])[0]))
        except InferenceError as exc:
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in case.items())
            raise BuildError(
                f"{what} fails on golden case {n} ({shapes}): {exc}; {_REAL_INPUTS_FIX}"
            ) from None
    return out


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


def _golden(bundled: Path, src: _Inputs, quantized: bool, report: Progress) -> Golden:
    """Expected outputs of the bundled model for the golden cases, as a device computes
    them, and a tolerance per output (:func:`sdk.build.golden.derive_golden`).

    Raises:
        BuildError: a case fails on the bundled model, or an output is not reproducible.
    """
    report("golden outputs", 0, 1)
    try:
        golden = derive_golden(
            bundled,
            src.cases,
            runtime=src.runner,
            reference=src.reference if quantized else None,
            request_elements=request_elements(src.cases[0]),
        )
    except InferenceError as exc:
        raise BuildError(f"the bundled model fails on its golden cases: {exc}") from None
    report("golden outputs", 1, 1)
    outputs = golden.details["outputs"]
    # A detector finds nothing in noise: outputs that stay at zero over every synthesised
    # case would let a broken model pass the health check.
    if src.synthesized and all(
        how["constant"] and how["magnitude"] <= how["floor"] for how in outputs.values()
    ):
        raise BuildError(
            f"on the synthesised golden inputs every output of the model stays nearly constant"
            f" at zero ({', '.join(outputs)}): a health check on them would test nothing;"
            f" {_REAL_INPUTS_FIX}"
        )
    return golden


def _model_section(bundled: Path, stage: Path, golden: Golden) -> ModelSpec:
    """The manifest's model section, naming the output that carries class scores (found on
    the outputs the bundled model computed for the first golden case)."""
    spec = model_spec(bundled)
    first = golden.expected[0]
    scores = scores_index(spec.outputs, [first[o.name] for o in spec.outputs])
    return replace(
        spec,
        file=bundled.relative_to(stage).as_posix(),
        scores_output=None if scores is None else spec.outputs[scores].name,
        request_elements=request_elements(golden.cases[0]),
    )


def _payload(
    stage: Path,
    model_member: str,
    golden: Golden,
    encrypt_for: Sequence[X25519PublicKey],
    *,
    add: Callable[[Mapping[str, Path]], Mapping[str, Path]],
) -> tuple[dict[str, Path], Encryption | None]:
    """The payload files by member path, encrypted for ``encrypt_for`` when given;
    ``add`` makes more members from the plain ones (the provenance, which names them).

    Raises:
        ConfigError: the files cannot be encrypted.
    """
    (stage / "health").mkdir()
    # Case 0 also as the single golden request that agents before schema 1.2 replay.
    files = {
        GOLDEN_INPUTS: golden.cases[0],
        EXPECTED_OUTPUTS: golden.expected[0],
        CASE_INPUTS: case_arrays(golden.cases),
        CASE_EXPECTED: case_arrays(golden.expected),
    }
    for member, arrays in files.items():
        write_npz(stage / member, arrays)
    payload = {p: stage / p for p in (model_member, *files)}
    payload.update(add(payload))
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


def _health(
    bundled: Path, golden: Golden, src: _Inputs, metadata: BuildMetadata, report: Progress
) -> tuple[Health, dict[str, Any]]:
    """The manifest's health section, with tolerances measured on ``src.providers``
    (:mod:`sdk.build._provider_tolerances`), and how they were all set, for the report.

    Raises:
        ConfigError, BuildError, GateError: as :func:`measure_providers`.
    """
    # A fixed tolerance in the metadata overrides the derived ones, for every output.
    fixed = metadata.atol is not None or metadata.rtol is not None
    health = Health(
        golden_inputs=GOLDEN_INPUTS,
        expected_outputs=EXPECTED_OUTPUTS,
        tolerance=(
            Tolerance(atol=metadata.atol or 0.0, rtol=metadata.rtol or 0.0)
            if fixed
            else golden.tolerance
        ),
        latency_budget_p95_ms=metadata.latency_budget_p95_ms,
        probation=metadata.probation,
        cases=GoldenCases(
            count=len(golden.cases),
            inputs=CASE_INPUTS,
            expected=CASE_EXPECTED,
            tolerances={} if fixed else golden.tolerances,
        ),
    )
    if not src.providers:
        return health, dict(golden.details)
    measured = measure_providers(
        bundled, golden, health, runtime=src.runner, providers=src.providers, report=report
    )
    details = {**golden.details, "providers": dict(measured.details)}
    return replace(health, provider_tolerances=measured.tables), details


def _manifest(
    src: _Inputs,
    spec: ModelSpec,
    *,
    metadata: BuildMetadata,
    created: datetime,
    quantization: Quantization,
    health: Health,
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
        health=health,
        drift_reference=drift_reference(drift_source) if drift_source is not None else None,
        model_card=metadata.model_card,
        files=tuple(
            FileEntry(path=p, size=path.stat().st_size, sha256=file_sha256(path))
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
